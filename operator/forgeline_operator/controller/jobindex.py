"""Every job's phase as this operator last saw it: the running-jobs cap, `fromJob` dependencies
and the `forgeline_jobs` gauge read it. One lock guards it, including the cap's reservations."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from . import decisions


class JobKey(NamedTuple):
    namespace: str
    kind: str
    name: str


@dataclass(frozen=True)
class IndexEntry:
    phase: str
    created: str = ""
    output_uri: str | None = None
    reason: str | None = None
    promoted: str | None = None
    """Its Promoted condition's status (True/False), None without a promotion gate."""
    promotion_message: str = ""
    """The Promoted condition's reason and message, as downstream jobs quote it."""


def _promotion(status: Mapping[str, Any]) -> dict[str, Any]:
    cond = next((c for c in status.get("conditions") or [] if c.get("type") == "Promoted"), None)
    if cond is None:
        return {}
    return {
        "promoted": cond.get("status"),
        "promotion_message": f"{cond.get('reason')}: {cond.get('message', '')}",
    }


class JobIndex:
    """Thread-safe: kopf runs sync handlers in a thread pool and the metrics scrape reads it too."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[JobKey, IndexEntry] = {}
        self._admitted: set[JobKey] = set()  # admitted, not yet seen Provisioning/Running

    def record(self, key: JobKey, status: Mapping[str, Any], created: str) -> None:
        entry = IndexEntry(
            phase=status.get("phase") or "Pending",
            created=created,
            output_uri=status.get("outputUri"),
            reason=status.get("reason"),
            **_promotion(status),
        )
        with self._lock:
            self._jobs[key] = entry

    def forget(self, key: JobKey) -> None:
        with self._lock:
            self._jobs.pop(key, None)
            self._admitted.discard(key)

    def get(self, key: JobKey) -> IndexEntry | None:
        with self._lock:
            return self._jobs.get(key)

    def phase_counts(self) -> dict[tuple[str, str], int]:
        """(kind, phase) → number of jobs."""
        counts: dict[tuple[str, str], int] = {}
        with self._lock:
            for key, entry in self._jobs.items():
                counts[(key.kind, entry.phase)] = counts.get((key.kind, entry.phase), 0) + 1
        return counts

    def admit(self, key: JobKey, cap: int) -> decisions.Admitted | decisions.Queued:
        """Ask `decisions.admission` and, if admitted, hold the slot until `release` — atomically,
        so two jobs reconciled at once never both take the last slot."""
        with self._lock:
            phases = {k: (e.phase, e.created) for k, e in self._jobs.items()}
            verdict = decisions.admission(phases, self._admitted, key, cap)
            if isinstance(verdict, decisions.Admitted):
                self._admitted.add(key)
            return verdict

    def release(self, key: JobKey) -> None:
        """The job holds no slot any more (finished, failed, suspended or deleted)."""
        with self._lock:
            self._admitted.discard(key)
