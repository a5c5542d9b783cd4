"""Eval-gated promotion: `spec.promotion` says what "better" means, `decide` says whether a finished
job's output is, from its held-out evals before and after training. Pure: the operator sets the
`Promoted` condition with it and the trainer writes the same verdict into metrics.json and the model
card, so the two never disagree.

Significance: each eval carries the half-width of its 95% interval (`eval_loss_ci95`,
`accuracy_ci95`). The difference of two evals on the same held-out set has a 95% half-width of at
most sqrt(before² + after²) (the two are positively correlated, so this is conservative): with
`significance: ci95` the improvement must exceed it, and `minImprovement`, to count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import Field

from ._base import ApiModel, FieldIssue

PromotionMetric = Literal[
    "eval_loss", "perplexity", "accuracy", "preference_accuracy", "reward_margin", "mean_reward"
]
LOWER_IS_BETTER = frozenset({"eval_loss", "perplexity"})
INTERVAL_OF = {"eval_loss": "eval_loss_ci95", "perplexity": "eval_loss_ci95", "accuracy": "accuracy_ci95"}
"""Where each metric's 95% interval comes from (perplexity is judged on the loss it is exp of)."""


class Promotion(ApiModel):
    """When the job's output counts as better than what it started from (its eval before training). The result is the `Promoted` condition; an output that is not promoted is kept but marked, and a job that trains from it (`fromJob`) refuses it unless that reference sets allowUnpromoted."""

    metric: PromotionMetric
    """The held-out metric that decides: eval_loss or perplexity (lower is better), accuracy, preference_accuracy, reward_margin or mean_reward (higher is better)."""
    min_improvement: float = Field(default=0.0, ge=0)
    """The least improvement over the eval before training that counts, in the metric's units (e.g. 0.05 of eval_loss)."""
    significance: Literal["ci95", "none"] = "ci95"
    """ci95: the improvement must also exceed the 95% interval of the difference (eval_loss, perplexity and accuracy have one); none: minImprovement alone."""
    threshold: float | None = None
    """Instead of improving on the base: promoted when the metric reaches this value (at most it for eval_loss and perplexity, at least it otherwise)."""

    def issues(self, prefix: tuple[str, ...], family: str, evaluates: bool) -> list[FieldIssue]:
        """Problems with this gate for a job of `family` (see METRICS) that does or does not evaluate."""
        out: list[FieldIssue] = []
        if not evaluates:
            out.append(
                FieldIssue(
                    prefix,
                    "promotion needs a held-out evaluation, and evaluation is off",
                    "set evaluation.holdoutFraction > 0 or give evaluation.sources, or remove promotion",
                )
            )
        reported = METRICS[family]
        if self.metric not in reported:
            out.append(
                FieldIssue(
                    prefix + ("metric",),
                    f"{FAMILY_NAMES[family]} do not report {self.metric}",
                    f"use {' or '.join(reported)}",
                )
            )
        elif self.threshold is None and self.significance == "ci95" and not reported[self.metric]:
            with_ci = [m for m, has in reported.items() if has]
            out.append(
                FieldIssue(
                    prefix + ("significance",),
                    f"{self.metric} has no 95% interval here to test the improvement against",
                    "set significance: none with a minImprovement"
                    + (f", or use {' or '.join(with_ci)}" if with_ci else ""),
                )
            )
        return out


METRICS: dict[str, dict[str, bool]] = {
    "pretrain": {"eval_loss": True, "perplexity": True},
    "sft": {"eval_loss": True, "perplexity": True, "accuracy": True},
    "merge": {"eval_loss": True, "perplexity": True, "accuracy": True},
    "preference": {"eval_loss": False, "preference_accuracy": False, "reward_margin": False},
    "rl": {"mean_reward": False},
}
"""The metrics each recipe family's evals report, and whether each comes with a 95% interval."""
FAMILY_NAMES = {
    "pretrain": "TrainingJob evals",
    "sft": "supervised fine-tunes' evals",
    "merge": "adapter merges' evals",
    "preference": "DPO and reward-model evals",
    "rl": "GRPO evals",
}


@dataclass(frozen=True)
class Verdict:
    """Whether an output is promoted, why (one CamelCase word), the numbers, and a sentence."""

    promoted: bool
    reason: Literal[
        "Improved", "ThresholdMet", "Regressed", "NotSignificant", "ThresholdNotMet", "NoEvaluation"
    ]
    metric: str
    message: str
    before: float | None = None
    after: float | None = None
    improvement: float | None = None
    """after against before, positive when better (before − after for losses)."""
    interval: float | None = None
    """95% half-width of the difference (None: the metric has none, or significance: none)."""
    required: float | None = None
    """What the improvement had to exceed: max(minImprovement, interval)."""
    threshold: float | None = None

    def status(self) -> dict[str, Any]:
        """status.promotion (camelCase, without empties)."""
        names = {"improvement": "improvement", "interval": "interval95", "required": "required"}
        out = {names.get(k, k): v for k, v in asdict(self).items() if v is not None}
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in out.items()}


def decide(spec: Promotion, before: Mapping[str, float] | None, after: Mapping[str, float] | None) -> Verdict:
    """The verdict on an output from its evals before and after training."""
    m = spec.metric
    lower = m in LOWER_IS_BETTER
    b, a = _value(before, m), _value(after, m)
    if a is None:
        have = ", ".join(sorted(k for k in (after or {}) if not k.endswith(("_ci95", "_tokens")))) or "none"
        return Verdict(False, "NoEvaluation", m, f"no {m} in the eval after training (it has: {have})")
    if spec.threshold is not None:
        met = a <= spec.threshold if lower else a >= spec.threshold
        word = "at most" if lower else "at least"
        message = f"{m} {_g(a)} after training; promotion needs {word} {_g(spec.threshold)}"
        return Verdict(
            met,
            "ThresholdMet" if met else "ThresholdNotMet",
            m,
            message + (": promoted" if met else ": not promoted"),
            before=b,
            after=a,
            threshold=spec.threshold,
        )
    if b is None:
        return Verdict(
            False, "NoEvaluation", m, f"no {m} in the eval before training to compare with", after=a
        )
    improvement = (b - a) if lower else (a - b)
    interval = None
    if spec.significance == "ci95" and m in INTERVAL_OF:
        key = INTERVAL_OF[m]
        ci_b, ci_a = _value(before, key), _value(after, key)
        if ci_b is not None and ci_a is not None:
            interval = math.hypot(ci_b, ci_a)
            if m == "perplexity":  # the interval is the loss's: judge the loss, report perplexity
                improvement_loss = _value(before, "eval_loss"), _value(after, "eval_loss")
                if None not in improvement_loss:
                    improvement = improvement_loss[0] - improvement_loss[1]  # type: ignore[operator]
    required = max(spec.min_improvement, interval or 0.0)
    judged = "eval_loss" if m == "perplexity" and interval is not None else m
    numbers = f"{m} {_g(b)} → {_g(a)}"
    gap = f"{judged} {'improved' if improvement > 0 else 'changed'} by {_g(improvement)}"
    bar = f"needs more than {_g(required)}" + (
        f" (the 95% interval of the difference ±{_g(interval)}"
        + (f", minImprovement {_g(spec.min_improvement)})" if spec.min_improvement else ")")
        if interval is not None
        else f" (minImprovement {_g(spec.min_improvement)})"
    )
    if improvement < 0:
        reason, promoted, verdict = "Regressed", False, "worse than before training: not promoted"
    elif improvement > required:
        reason, promoted, verdict = "Improved", True, "promoted"
    else:
        reason, promoted, verdict = "NotSignificant", False, "not promoted"
    if spec.significance == "ci95" and interval is None and m in INTERVAL_OF and reason == "Improved":
        verdict += " (the evals carried no interval: minImprovement alone decided)"
    return Verdict(
        promoted,
        reason,  # type: ignore[arg-type]
        m,
        f"{numbers}: {gap}, {bar}; {verdict}",
        before=b,
        after=a,
        improvement=improvement,
        interval=interval,
        required=required,
    )


def _value(metrics: Mapping[str, Any] | None, key: str) -> float | None:
    value = (metrics or {}).get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _g(value: float | None) -> str:
    return "?" if value is None else f"{value:.4g}"
