"""Goodput: where a job's time (and its GPU- or CPU-core-hours) went. Pure functions.

Google's ML goodput measurement splits a job's time into goodput (productive steps) and named
badput. Forgeline's categories, from its own records:

    queued             creation → a slot (upstream jobs, the running-jobs cap, Kueue): nothing held
    provisioning       the Ray cluster starting, first and after a lost cluster
    startup            each attempt's submission → its first step (imports, data, model, workers,
                       the first step itself), less the evals and restores timed in it
    productive         optimizer steps (the trainer's ledger: step time after each attempt's first)
    redone             steps computed again after a failure or preemption: the steps between the
                       checkpoint an attempt resumed from and the furthest step reached before,
                       × that attempt's measured step time (taken out of its step time)
    evaluation         held-out evals (before, during and after training)
    checkpointSave     checkpoint writes (a preemption's last one included)
    checkpointRestore  finding, downloading and loading the checkpoint an attempt resumes from
    stalled            a stall the watchdog stopped: from the last step to the stop
    other              the rest of each attempt: publishing the output, shutdown, Ray's own start

The operator's clock (`status.goodput.clock`) times queued and provisioning across transitions;
an attempt is split when it ends (`close_attempt`) from the trainer's `ledger` in its progress
records; the attempt that runs now is split live the same way (`summary`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..api.status import GoodputCategory

CATEGORIES: tuple[str, ...] = GoodputCategory.__args__  # type: ignore[attr-defined]
BADPUT: tuple[str, ...] = tuple(c for c in CATEGORIES if c != "productive")
HELD: tuple[str, ...] = tuple(c for c in CATEGORIES if c != "queued")
"""The categories that hold the job's chips (a queued job holds nothing): chip-hours and the goodput
fraction count these."""
MAX_ATTEMPTS_KEPT = 20
"""status.goodput.attempts keeps the newest this many (the totals keep every attempt)."""


def segment(phase: str | None, reason: str | None) -> str | None:
    """The clock's category for a phase: queued, provisioning, or None (an attempt runs, the job is
    suspended or finished)."""
    if phase in ("Pending", "Waiting") or (phase == "Provisioning" and reason == "QueuedByKueue"):
        return "queued"
    if phase == "Provisioning":
        return "provisioning"
    return None


def on_transition(
    goodput: Mapping[str, Any] | None, phase: str, reason: str, at: datetime, created: str | None = None
) -> dict[str, Any] | None:
    """status.goodput after a transition to (phase, reason) at `at`: the open clock segment closed
    into its category when the category changes; None when nothing changes. A job's first
    transition starts from its creation (`created`): queued until then, whatever comes next."""
    g = dict(goodput or {})
    clock = g.get("clock") or None
    fresh = not g and bool(created)
    if fresh:
        clock = {"category": "queued", "since": created}
    new = segment(phase, reason)
    if clock is not None and clock.get("category") == new:
        return {**g, "clock": clock} if fresh else None
    if clock is None and new is None:
        return None
    if clock is not None:
        closed = dict(g.get("closed") or {})
        category = clock.get("category")
        closed[category] = round(closed.get(category, 0.0) + _since(clock.get("since"), at), 3)
        g["closed"] = closed
    g["clock"] = {"category": new, "since": _stamp(at)} if new else None
    return g


@dataclass(frozen=True)
class Attempt:
    """What is known of one attempt (Ray job submission) for splitting its time."""

    submitted: float
    """When it was submitted (epoch seconds)."""
    ended: float
    """When it ended (or now, for the attempt that runs)."""
    first: Mapping[str, Any] | None = None
    """Its first progress record (the trainer stamps `time` and carries its `ledger`)."""
    last: Mapping[str, Any] | None = None
    """Its latest record carrying a ledger (progress, done, or the ledger of a failing attempt)."""
    furthest_before: int = 0
    """The furthest step an earlier attempt reached."""
    stalled_since: float | None = None
    """When the watchdog's stall began (epoch seconds), for an attempt it stopped."""
    reached: int = 0
    """The furthest step the attempt is known to have reached (a checkpoint after its last
    progress record counts)."""


def split(a: Attempt) -> dict[str, Any]:
    """One attempt's seconds by category, with its steps: {"seconds": {...}, "firstStep",
    "lastStep", "resumedFrom", "redoneSteps", "secondsPerStep"}."""
    wall = max(0.0, a.ended - a.submitted)
    last_ledger = dict((a.last or {}).get("ledger") or (a.first or {}).get("ledger") or {})
    first_ledger = dict((a.first or {}).get("ledger") or {})
    seconds = dict.fromkeys(CATEGORIES[2:], 0.0)
    seconds["evaluation"] = _num(last_ledger, "evaluation")
    seconds["checkpointSave"] = _num(last_ledger, "checkpointSave")
    seconds["checkpointRestore"] = _num(last_ledger, "checkpointRestore")
    resumed = int(_num(last_ledger, "resumedFrom"))
    out: dict[str, Any] = {"resumedFrom": resumed, "redoneSteps": 0}
    if a.stalled_since is not None:
        seconds["stalled"] = max(0.0, a.ended - max(a.stalled_since, a.submitted))
    if a.first is None:  # no step reached: all of it start-up, but what was timed or stalled
        seconds["startup"] = max(0.0, wall - sum(seconds.values()))
    else:
        first_at = _num(a.first, "time") or a.submitted
        timed_before = sum(
            _num(first_ledger, k) for k in ("evaluation", "checkpointSave", "checkpointRestore")
        )
        seconds["startup"] = max(0.0, first_at - a.submitted - timed_before)
        steps = _num(last_ledger, "steps")
        timed_steps = int(_num(last_ledger, "stepsTimed"))
        last_step = max(int(_num(a.last or a.first, "step")), a.reached)
        per_step = steps / timed_steps if timed_steps else 0.0
        redone_steps = max(0, min(a.furthest_before, last_step) - resumed)
        # and within the attempt: worker groups Ray Train restarted (forgeline run allows that)
        within = int(_num(last_ledger, "redoneSteps"))
        seconds["redone"] = min(steps, redone_steps * per_step + _num(last_ledger, "redoneSeconds"))
        redone_steps += within
        seconds["productive"] = steps - seconds["redone"]
        out.update(
            firstStep=int(_num(a.first, "step")),
            lastStep=last_step,
            redoneSteps=redone_steps,
            secondsPerStep=round(per_step, 4) if per_step else None,
        )
    known = sum(seconds.values())
    if known > wall > 0:  # the trainer's clock and the operator's disagree a little: scale to the wall
        seconds = {k: v * wall / known for k, v in seconds.items()}
    seconds["other"] = max(0.0, wall - sum(seconds.values()))
    out["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return {k: v for k, v in out.items() if v is not None}


def close_attempt(
    goodput: Mapping[str, Any] | None, attempt: int, parts: Mapping[str, Any], ended_by: str
) -> dict[str, Any]:
    """status.goodput with an attempt's split added to the closed totals and the attempts list."""
    g = dict(goodput or {})
    closed = dict(g.get("closed") or {})
    for category, value in (parts.get("seconds") or {}).items():
        closed[category] = round(closed.get(category, 0.0) + float(value), 3)
    g["closed"] = closed
    entry = {"attempt": attempt, "endedBy": ended_by, **parts}
    g["attempts"] = [*(g.get("attempts") or []), entry][-MAX_ATTEMPTS_KEPT:]
    furthest = max(int(g.get("furthestStep") or 0), int(parts.get("lastStep") or 0))
    g["furthestStep"] = furthest
    g["redoneSteps"] = int(g.get("redoneSteps") or 0) + int(parts.get("redoneSteps") or 0)
    g["running"] = None  # null: the merge patch deletes it
    return g


def running_record(attempt: int, parts: Mapping[str, Any], at: datetime) -> dict[str, Any]:
    """status.goodput.running: the running attempt's split as this operator last made it, with
    when. An operator that restarts and must close the attempt before it has read the attempt's
    log (its Ray cluster deleted under it, say) closes it from this (`carried`)."""
    return {"attempt": attempt, **parts, "at": _stamp(at)}


def carried(running: Mapping[str, Any] | None, attempt: int, at: datetime) -> dict[str, Any] | None:
    """The split of attempt `attempt` ending at `at`, from its last `running` record: its
    categories as recorded, and the time since the record as `other` (nothing is known of it);
    None when the record is of another attempt or there is none."""
    if not running or running.get("attempt") != attempt or not running.get("at"):
        return None
    parts = {k: v for k, v in running.items() if k not in ("attempt", "at")}
    seconds = {k: float(v) for k, v in (running.get("seconds") or {}).items()}
    seconds["other"] = round(seconds.get("other", 0.0) + _since(running["at"], at), 3)
    return {**parts, "seconds": seconds}


def summary(
    goodput: Mapping[str, Any] | None,
    at: datetime,
    chips: float,
    chip_unit: str,
    running: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """status.goodput as written: the closed totals, the open clock segment to `at`, and the split
    of the attempt that runs (`running`, from `split`), with chip-hours, the fraction and a
    display."""
    g = dict(goodput or {})
    if running is not None and running.get("attempt") is not None:
        g["running"] = dict(running)
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    for category, value in (g.get("closed") or {}).items():
        if category in seconds:
            seconds[category] += float(value)
    clock = g.get("clock") or None
    if clock and clock.get("category") in seconds:
        seconds[clock["category"]] += _since(clock.get("since"), at)
    for category, value in ((running or {}).get("seconds") or {}).items():
        seconds[category] += float(value)
    total = sum(seconds.values())
    held = sum(seconds[c] for c in HELD)
    fraction = seconds["productive"] / held if held > 0 else None
    g.update(
        seconds={k: round(v, 1) for k, v in seconds.items()},
        totalSeconds=round(total, 1),
        heldSeconds=round(held, 1),
        chips=chips,
        chipUnit=chip_unit,
        chipHours=round(held * chips / 3600, 6),
        productiveChipHours=round(seconds["productive"] * chips / 3600, 6),
        fraction=None if fraction is None else round(fraction, 4),
        display=display(fraction, seconds),
        updatedAt=_stamp(at),
    )
    # a closed clock (and an ended attempt's running record) stays in as null: the status is written
    # with a merge patch, where only a null deletes the field (left out, it would stay and count again)
    return {k: v for k, v in g.items() if v is not None or k in ("clock", "running")}


def display(fraction: float | None, seconds: Mapping[str, float]) -> str | None:
    """`62%`, or `62% (startup 20%)` naming the largest badput when it is at least a tenth."""
    if fraction is None:
        return None
    held = sum(seconds.get(c, 0.0) for c in HELD)
    worst = max(BADPUT[1:], key=lambda c: seconds.get(c, 0.0))
    share = seconds.get(worst, 0.0) / held if held else 0.0
    text = f"{fraction:.0%}"
    return f"{text} ({worst} {share:.0%})" if share >= 0.1 else text


def chips_of(workers: int, gpus_per_worker: int, cpu_cores: float) -> tuple[float, str]:
    """(chips the job holds, their unit): GPUs, or CPU cores on a CPU pool."""
    if gpus_per_worker:
        return float(workers * gpus_per_worker), "GPU"
    return float(workers) * cpu_cores, "CPU core"


def pipeline(stages: list[Mapping[str, Any]]) -> dict[str, Any]:
    """A pipeline's goodput: its stages' status.goodput summed (seconds, chip-hours), with the
    fraction of the whole."""
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    chip_hours = productive_hours = 0.0
    for g in stages:
        for category, value in (g.get("seconds") or {}).items():
            if category in seconds:
                seconds[category] += float(value)
        chip_hours += float(g.get("chipHours") or 0.0)
        productive_hours += float(g.get("productiveChipHours") or 0.0)
    held = sum(seconds[c] for c in HELD)
    fraction = seconds["productive"] / held if held else None
    return {
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "heldSeconds": round(held, 1),
        "chipHours": round(chip_hours, 6),
        "productiveChipHours": round(productive_hours, 6),
        "fraction": None if fraction is None else round(fraction, 4),
        "stages": len(stages),
    }


def epoch(timestamp: str | None) -> float | None:
    """An RFC 3339 status time as epoch seconds."""
    if not timestamp:
        return None
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def _since(timestamp: str | None, at: datetime) -> float:
    start = epoch(timestamp)
    return max(0.0, at.timestamp() - start) if start is not None else 0.0


def _stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _num(record: Mapping[str, Any] | None, key: str) -> float:
    value = (record or {}).get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
