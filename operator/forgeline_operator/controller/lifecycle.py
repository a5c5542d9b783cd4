"""The job state machine as data: one table says which conditions each phase sets.

    Pending → (Waiting) → Provisioning → Running → Succeeded | Failed;  any non-terminal → Suspended

`status_patch()` builds every phase, reason, message and conditions patch, and
`reconciler.StatusWriter.transition` is its one caller, so every transition looks the same in
`kubectl get`, `kubectl describe` and the Events.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ..api.status import eval_size_warning, is_terminal

CONDITION_TYPES = ("Waiting", "ClusterReady", "Running", "Suspended", "Complete", "Failed")

# phase -> condition type -> status ("True"/"False"); types not listed keep "False".
_TABLE: dict[str, dict[str, str]] = {
    "Pending": {},
    "Waiting": {"Waiting": "True"},
    "Provisioning": {},
    "Running": {"ClusterReady": "True", "Running": "True"},
    "Succeeded": {"Complete": "True"},
    "Failed": {"Failed": "True"},
    "Suspended": {"Suspended": "True"},
}


def now(precise: bool = False) -> str:
    """The time as Kubernetes writes it (to the second), or to the millisecond."""
    at = datetime.now(UTC)
    if precise:
        return at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def conditions_for(
    phase: str, reason: str, message: str, generation: int | None, previous: list[dict[str, Any]], at: str
) -> list[dict[str, Any]]:
    """Standard conditions for a phase; lastTransitionTime moves only when a status flips."""
    old = {c.get("type"): c for c in previous}
    wanted = _TABLE[phase]
    out = []
    for ctype in CONDITION_TYPES:
        status = wanted.get(ctype, "False")
        before = old.get(ctype)
        flipped = before is None or before.get("status") != status
        if status == "True" or (ctype == "ClusterReady" and phase == "Provisioning"):
            why, text = reason, message
        else:
            why, text = phase, ""
        cond = {
            "type": ctype,
            "status": status,
            "reason": why,
            "message": text,
            "lastTransitionTime": at if flipped else before.get("lastTransitionTime", at),
            "observedGeneration": generation,
        }
        # No empty strings or nulls: a merge patch (and apiserver 1.20) reads "" as null.
        out.append({k: v for k, v in cond.items() if v not in ("", None)})
    # Conditions outside the phase table (Fits, BudgetAtRisk) are set on their own and kept.
    return out + [c for c in previous if c.get("type") not in CONDITION_TYPES]


def set_condition(
    previous: list[dict[str, Any]],
    ctype: str,
    status: str,
    reason: str,
    message: str,
    generation: int | None,
) -> list[dict[str, Any]] | None:
    """The conditions with `ctype` set (lastTransitionTime moves only when its status flips), or
    None when nothing would change."""
    before = next((c for c in previous if c.get("type") == ctype), None)
    if before is not None and (
        before.get("status"),
        before.get("reason"),
        before.get("message", ""),
        before.get("observedGeneration"),
    ) == (status, reason, message, generation):
        return None
    flipped = before is None or before.get("status") != status
    at = now() if flipped else before.get("lastTransitionTime", now())
    cond = {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": at,
        "observedGeneration": generation,
    }
    cond = {k: v for k, v in cond.items() if v not in ("", None)}
    return [cond if c.get("type") == ctype else c for c in previous] if before else [*previous, cond]


def status_patch(
    status: dict[str, Any], phase: str, reason: str, message: str, generation: int | None, **fields: Any
) -> dict[str, Any]:
    """A status patch moving to `phase`, with conditions, timestamps and extra fields."""
    at = now()
    patch: dict[str, Any] = {
        "phase": phase,
        "reason": reason,
        "message": message or phase,
        "observedGeneration": generation,
        "conditions": conditions_for(phase, reason, message, generation, status.get("conditions") or [], at),
        **fields,
    }
    if is_terminal(phase) and not status.get("completionTime"):
        patch["completionTime"] = at
    return patch


def changed(status: dict[str, Any], phase: str, reason: str, message: str) -> bool:
    return (status.get("phase"), status.get("reason"), status.get("message")) != (phase, reason, message)


def display(loss: float | None, tokens_per_second: float | None, mfu: float | None) -> dict[str, str]:
    """Numbers as a person reads them: loss 1.752364 → "1.75", 46150.21 tokens/s → "46.2k",
    MFU 0.30329 → "30%" (what `kubectl get` prints)."""
    shown: dict[str, str] = {}
    if loss is not None:
        shown["loss"] = f"{loss:.3g}"
    if tokens_per_second is not None:
        rate = tokens_per_second
        if rate >= 999_950:
            shown["tokensPerSecond"] = f"{rate / 1e6:.1f}M"
        else:
            shown["tokensPerSecond"] = f"{rate / 1e3:.1f}k" if rate >= 999.5 else f"{rate:.0f}"
    if mfu is not None:
        shown["mfu"] = f"{mfu * 100:.0f}%" if mfu >= 0.01 else f"{mfu * 100:.2g}%"
    return shown


def progress_from(
    record: dict[str, Any],
    evals: dict[str, Any] | None,
    previous: dict[str, Any] | None = None,
    baseline: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A trainer progress record → status.progress (camelCase, with a `kubectl get` summary).
    `previous` (the status.progress before it) carries stepAdvancedAt over while the step stands,
    and the eval baseline (the step-0 eval record `baseline`, once seen) for good."""
    step, total = int(record.get("step", 0)), record.get("total_steps")
    out: dict[str, Any] = {"step": step, "updatedAt": now()}
    if total:
        out.update(
            totalSteps=int(total), percent=min(100, int(100 * step / total)), summary=f"{step}/{total}"
        )
        eta = record.get("eta_seconds")
        if isinstance(eta, (int, float)) and total > step:
            out["secondsPerStep"] = round(float(eta) / (total - step), 4)
    for src, dst in (
        ("loss", "loss"),
        ("learning_rate", "learningRate"),
        ("grad_norm", "gradNorm"),
        ("tokens_per_second", "tokensPerSecond"),
        ("samples_per_second", "samplesPerSecond"),
        ("mfu", "mfu"),
        ("eta_seconds", "etaSeconds"),
        ("epoch", "epoch"),
        ("trainable_fraction", "trainableFraction"),
    ):
        if isinstance(record.get(src), (int, float)):
            out[dst] = float(record[src])
    before = previous or {}
    if before.get("step") == step and before.get("stepAdvancedAt"):
        out["stepAdvancedAt"] = before["stepAdvancedAt"]
    else:
        out["stepAdvancedAt"] = out["updatedAt"]
    shown = display(out.get("loss"), out.get("tokensPerSecond"), out.get("mfu"))
    if shown:
        out["display"] = shown
    if evals:
        out["evalMetrics"] = _eval_values(evals)
        warning = eval_size_warning(out["evalMetrics"])
        if warning:
            out["evalWarning"] = warning
    base = _eval_values(baseline) if baseline else before.get("evalBaseline")
    if base:
        out["evalBaseline"] = base
        after = out.get("evalMetrics") if evals and evals.get("step") else None
        gain = eval_gain(base, after)
        if gain:
            out.setdefault("display", {})["eval"] = gain
    return out


def _eval_values(record: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if k not in ("type", "step", "time") and isinstance(v, (int, float))
    }


# The headline held-out metric of each kind of job, in order of preference: (key, label, percent).
_HEADLINE = (
    ("preference_accuracy", "pref acc", True),
    ("mean_reward", "reward", False),
    ("accuracy", "acc", True),
    ("perplexity", "ppl", False),
    ("eval_loss", "loss", False),
)


def eval_gain(baseline: dict[str, float], after: dict[str, float] | None) -> str | None:
    """The headline held-out metric before → after training, as a person reads it: `ppl 812→143`
    (pretraining), `acc 12%→61%` (SFT token accuracy), `pref acc 48%→83%` (reward model; DPO's
    untrained start, all ties, reads `pref acc tie→81%`), `reward 0.12→0.80` (GRPO); the
    baseline alone while no eval after training has come."""
    for key, label, percent in _HEADLINE:
        if key in baseline:

            def shown(values: dict[str, float], key: str = key, percent: bool = percent) -> str:
                if values.get("preference_ties") == 1.0:
                    return "tie"  # DPO before training: every pair's margin is exactly 0
                v = values[key]
                return f"{v * 100:.0f}%" if percent else f"{v:.3g}"

            if after is None or key not in after:
                return f"{label} {shown(baseline)}"
            return f"{label} {shown(baseline)}→{shown(after)}"
    return None
