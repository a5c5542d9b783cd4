"""What a running job costs, in GPU-hours and money, and what it will cost at its current pace.

Pure arithmetic over the job's spec and status, so the reconciler, the tests and `kubectl get`
agree: GPU-hours are what the job holds allocated (workers × gpusPerWorker × wall-clock hours since
status.startTime, retries included — the same clock spec.budget.maxGpuHours is enforced on); the
projection adds the trainer's own time-to-finish estimate (its live tokens/s over the remaining
steps) at the same allocation.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .decisions import parse_time


@dataclass(frozen=True)
class Cost:
    """status.cost of a job that holds GPUs."""

    gpus: int
    gpu_hours: float
    projected_gpu_hours: float | None
    """None until the trainer has reported an ETA (or once the job has finished: then it is gpu_hours)."""
    price_per_gpu_hour: float | None
    currency: str
    finished: bool = False
    """The clock has stopped: the display shows what was spent, without a projection."""

    @property
    def cost(self) -> float | None:
        return None if self.price_per_gpu_hour is None else self.gpu_hours * self.price_per_gpu_hour

    @property
    def projected_cost(self) -> float | None:
        if self.price_per_gpu_hour is None or self.projected_gpu_hours is None:
            return None
        return self.projected_gpu_hours * self.price_per_gpu_hour

    def display(self) -> str:
        """What the Cost printer column shows: `$4.20→$31` (spent → projected total), or GPU-hours
        where no price is configured: `1.7→12 GPU-h`; what was spent once the job has finished."""
        if self.price_per_gpu_hour is not None:
            spent, total = self.cost, self.projected_cost
            shown = f"{self.currency}{_short(spent or 0.0)}"
            if total is None or self.finished:
                return shown
            return shown + f"→{self.currency}{_short(total)}"
        shown = _short(self.gpu_hours)
        if self.projected_gpu_hours is not None and not self.finished:
            shown += f"→{_short(self.projected_gpu_hours)}"
        return f"{shown} GPU-h"

    def status(self, at: str) -> dict[str, Any]:
        """The status.cost patch (camelCase, without unset fields)."""
        fields = {
            "gpus": self.gpus,
            "gpuHours": round(self.gpu_hours, 6),
            "projectedGpuHours": _rounded(self.projected_gpu_hours),
            "pricePerGpuHour": self.price_per_gpu_hour,
            "cost": _rounded(self.cost),
            "projectedCost": _rounded(self.projected_cost),
            "currency": self.currency if self.price_per_gpu_hour is not None else None,
            "display": self.display(),
            "updatedAt": at,
        }
        return {k: v for k, v in fields.items() if v is not None}


def _rounded(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def _short(value: float) -> str:
    """2 decimals below 10, 3 significant digits up to 1,000, then a k/M suffix."""
    if value < 10:
        return f"{value:.2f}"
    if value < 1000:
        return f"{value:.0f}"
    if value < 999_500:
        return f"{value / 1e3:.3g}k"
    return f"{value / 1e6:.3g}M"


def live(
    gpus: int,
    price_per_gpu_hour: float | None,
    currency: str,
    start_time: str | None,
    eta_seconds: float | None,
    at: datetime | None = None,
    *,
    finished: bool = False,
) -> Cost | None:
    """A job's cost so far and at its current pace (None for CPU jobs and jobs not yet started).

    `gpus` is workers × gpusPerWorker; `eta_seconds` the trainer's estimate of the time left
    (status.progress.etaSeconds); `finished` ends the clock (the projection is what was spent)."""
    if gpus <= 0 or not start_time:
        return None
    at = at or datetime.now(UTC)
    hours = max(0.0, (at - parse_time(start_time)).total_seconds()) / 3600
    used = gpus * hours
    if finished:
        projected: float | None = used
    elif eta_seconds is not None and eta_seconds >= 0:
        projected = used + gpus * eta_seconds / 3600
    else:
        projected = None
    return Cost(gpus, used, projected, price_per_gpu_hour, currency, finished)


def budget_at_risk(
    budget: Any, cost: Cost | None, start_time: str | None, eta_seconds: float | None, at: datetime
) -> str | None:
    """Why the job is projected to exceed its spec.budget at its current pace (a message naming
    the field and what to do), or None. The budget itself is enforced at the limit elsewhere
    (`decisions.budget_exceeded`); this is the early warning."""
    if budget is None or not start_time or eta_seconds is None:
        return None
    limit = budget.max_gpu_hours
    projected = cost.projected_gpu_hours if cost is not None else None
    if cost is not None and projected is not None and limit is not None and projected > limit:
        return (
            f"projected {projected:.3g} GPU-hours at the current pace "
            f"({cost.gpu_hours:.3g} used, {eta_seconds / 3600:.2f} h to go on {cost.gpus} GPUs), "
            f"over spec.budget.maxGpuHours ({limit:g}): the job will be stopped at the "
            "limit; raise the budget, or lower training.maxSteps"
        )
    deadline = budget.active_deadline_seconds
    if deadline is not None:
        finish = (at - parse_time(start_time)).total_seconds() + eta_seconds
        if finish > deadline:
            return (
                f"projected to finish {finish:.0f}s after it started, over "
                f"spec.budget.activeDeadlineSeconds ({deadline}s): the job will be stopped at the limit; "
                "raise the deadline, or lower training.maxSteps"
            )
    return None
