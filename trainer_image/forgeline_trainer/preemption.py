"""Graceful preemption: on SIGTERM, finish the step, write a checkpoint at it, stop with `Preempted`.

Kubernetes sends SIGTERM to a pod it drains or reclaims (spot), waits the pod's
terminationGracePeriodSeconds (spec.preemption.gracePeriodSeconds + a margin, set by the
operator), then SIGKILLs it.

Ray Train v2 runs the train function in a thread of the worker actor, and Python installs signal
handlers only from the main thread. The actor's main thread runs its tasks (and Ray's own SIGTERM
handler, which exits the process). So `install`, called from the train thread, asks the worker
actor to run `_install_handler` on its own main thread (an `execute` task on itself: Ray Train's
worker actor has that method, and its main thread is free while training runs in the thread).
The handler only records the signal; the train loop reads it after every step
(`Checkpointer.maybe_save`; in the TRL recipes `hf_trainer.PreemptionCallback`), where the workers
agree on it with one all-reduce, save and raise `Preempted` (`stop`). A second SIGTERM after the
grace period has run out falls back to Ray's handler.

In a KubeRay pod the SIGTERM never reaches the worker: the kubelet signals the container's PID 1,
`ray start --block`, which drains its Ray node (DRAIN_NODE_REASON_PREEMPTION, for
RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S, which the operator sets to the job's grace period) before
it stops the node's processes. Ray Train's PreemptionWatcher sees the drain and marks every
worker of the group (`mark_preempt`); `requested` reads that mark as well, so an eviction, a
`kubectl delete pod` or a drain of the worker's node checkpoints at the current step too.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from . import progress
from .errors import Preempted

_requested = threading.Event()
_saved = threading.Event()
_state: dict[str, Any] = {"at": None, "grace": 120.0, "previous": None, "step": None, "drain": None}


def _handler(signum: int, frame: Any) -> None:
    at = _state["at"]
    if at is not None:
        previous = _state["previous"]
        if time.monotonic() - at > _state["grace"] and callable(previous):
            previous(signum, frame)  # Ray's: exit now
        return
    _state["at"] = time.monotonic()
    _requested.set()
    timer = threading.Timer(_state["grace"], _grace_ran_out)
    timer.daemon = True
    timer.start()


def _grace_ran_out() -> None:
    if _saved.is_set():
        return
    progress.emit(
        {
            "type": "event",
            "message": "preemption grace period ran out before the checkpoint was written",
            "grace_period_seconds": _state["grace"],
            "last_step": _state["step"],
            "pid": os.getpid(),
            "hint": "a step plus a save take longer than spec.preemption.gracePeriodSeconds: "
            "raise it, or checkpoint more often (the next attempt resumes from the newest "
            "complete checkpoint)",
        }
    )


def _install_handler(grace_seconds: float) -> bool:
    """Runs on the worker process's main thread."""
    _state["grace"] = float(grace_seconds)
    current = signal.getsignal(signal.SIGTERM)
    if current is not _handler:
        _state["previous"] = current
        signal.signal(signal.SIGTERM, _handler)
    return True


def install(grace_seconds: float) -> str | None:
    """Catch SIGTERM in this worker process; None, or why it could not be done."""
    try:
        if threading.current_thread() is threading.main_thread():
            _install_handler(grace_seconds)
            return None
        import ray

        actor = ray.get_runtime_context().current_actor
        ray.get(actor.execute.remote(_install_handler, grace_seconds), timeout=60)
        return None
    except Exception as exc:  # noqa: BLE001 - preemption stays ungraceful, training goes on
        return f"{type(exc).__name__}: {exc}"


def note_step(step: int) -> None:
    """The last finished step (named by the grace-period event)."""
    _state["step"] = step


def requested() -> bool:
    """This process got SIGTERM, or Ray says a node of this worker group is being drained."""
    if _requested.is_set():
        return True
    notice = drain_notice()
    if notice is None:
        return False
    _state["at"] = _state["at"] or time.monotonic()
    _state["drain"] = notice
    _requested.set()
    return True


def drain_notice() -> dict[str, Any] | None:
    """Ray Train's mark on this worker that a node of its group is being drained (its pod got
    SIGTERM: an eviction, a deletion, a node drain), or None. Read from the worker's own context:
    `ray.train.get_preemption_info()` would be a barrier of its own every step, and the workers
    already agree through Checkpointer's one all-reduce."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        info = get_train_context().preemption_context.preemption_info
    except Exception:  # noqa: BLE001 - not in a Ray Train v2 worker, or another Ray: SIGTERM only
        return None
    if info is None:
        return None
    return {
        "nodes": list(info.preempted_node_ids),
        "ranks": list(info.preempted_ranks),
        "deadline_ms": info.deadline_ms,
    }


def seconds_since_signal() -> float | None:
    at = _state["at"]
    return None if at is None else time.monotonic() - at


def grace_seconds() -> float:
    return float(_state["grace"])


def checkpoint_written() -> float | None:
    """Mark the preemption checkpoint written; seconds it took since the signal."""
    _saved.set()
    return seconds_since_signal()


def stop(step: int, rank: int) -> None:
    """The preemption checkpoint at `step` is written (and reported to Ray Train): the worker that
    got the signal says so in an event, and every worker raises `Preempted`."""
    drain = _state.get("drain")
    if requested() and (drain is None or rank == 0):  # who got the signal (rank 0 for a drain)
        took = checkpoint_written()
        grace = grace_seconds()
        record: dict[str, Any] = {
            "type": "event",
            "message": "preempted: checkpoint written, stopping",
            "step": step,
            "rank": rank,
            "signal": "SIGTERM" if drain is None else "Ray node drain (its pod got SIGTERM)",
            "seconds_to_checkpoint": None if took is None else round(took, 2),
            "grace_period_seconds": grace,
        }
        if drain is not None:
            record["drained_ranks"] = drain["ranks"]
            if drain["deadline_ms"]:
                record["seconds_left_before_the_drain_deadline"] = round(
                    drain["deadline_ms"] / 1000 - time.time(), 1
                )
        if took is not None and took > grace:
            record["warning"] = (
                f"the step and the save took {took:.1f} s, more than the grace period of "
                f"{grace:g} s: on a node being drained the worker would have been killed first"
            )
        progress.emit(record)
    what = "worker got SIGTERM" if drain is None else f"the Ray node of rank(s) {drain['ranks']} is draining"
    raise Preempted(
        f"{what} (pod eviction, deletion, node drain or spot reclaim): checkpoint written at step "
        f"{step}; the next attempt resumes there"
    )


def _reset_for_tests() -> None:
    _requested.clear()
    _saved.clear()
    _state.update(at=None, step=None, drain=None)
