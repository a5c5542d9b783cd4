"""The job index: phases by job, phase counts for the gauge, and the cap applied atomically."""

from __future__ import annotations

import threading

from forgeline_operator.controller import decisions
from forgeline_operator.controller.jobindex import JobIndex, JobKey


def test_job_index_admits_atomically() -> None:
    """Many reconciles at once never take more slots than the cap (one lock, decision + reservation)."""
    index = JobIndex()
    keys = [JobKey("ns", "TrainingJob", f"job-{i:02d}") for i in range(40)]
    for i, key in enumerate(keys):
        index.record(key, {"phase": "Pending"}, f"2026-01-01T00:00:{i:02d}Z")
    admitted: list[JobKey] = []
    lock = threading.Lock()

    def _try(key: JobKey) -> None:
        if isinstance(index.admit(key, 3), decisions.Admitted):
            with lock:
                admitted.append(key)

    threads = [threading.Thread(target=_try, args=(k,)) for k in reversed(keys)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 3
    # one finishes: its slot goes to the oldest job still waiting, not to a younger one
    index.record(admitted[0], {"phase": "Succeeded"}, "")
    index.release(admitted[0])
    waiting = [k for k in keys if k not in admitted]
    assert isinstance(index.admit(waiting[1], 3), decisions.Queued)
    assert isinstance(index.admit(waiting[0], 3), decisions.Admitted)


def test_job_index_counts_phases_and_forgets() -> None:
    index = JobIndex()
    a, b = JobKey("ns", "TrainingJob", "a"), JobKey("ns", "FineTuneJob", "b")
    index.record(a, {"phase": "Running", "outputUri": "runs/a"}, "t")
    index.record(b, {}, "t")
    assert index.phase_counts() == {("TrainingJob", "Running"): 1, ("FineTuneJob", "Pending"): 1}
    assert index.get(a) is not None and index.get(a).output_uri == "runs/a"
    index.forget(a)
    assert index.get(a) is None and index.phase_counts() == {("FineTuneJob", "Pending"): 1}
