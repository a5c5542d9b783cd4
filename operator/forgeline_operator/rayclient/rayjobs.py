"""Submit and track trainer runs through the Ray Jobs API — one code path for every backend.

The same calls serve a KubeRay cluster (its head Service's dashboard port), an existing Ray
cluster named by address, and the embedded local Ray of `forgeline run`, tests and the demo.
Progress comes back as `FORGELINE_PROGRESS {json}` lines in the job's log (see
`forgeline_operator.api.jobconfig.PROGRESS_PREFIX`), so no shared storage is needed.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ..api.jobconfig import PROGRESS_PREFIX, FineTuneJobConfig, TrainingJobConfig, dump_job_config

CONFIG_ENV = "FORGELINE_JOB_CONFIG"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
TERMINAL_RAY_STATES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


class RayUnreachable(ConnectionError):
    """The Ray Jobs API at an address did not answer (connection refused, reset or timed out)."""

    def __init__(self, address: str, cause: BaseException) -> None:
        super().__init__(f"the Ray head at {address} does not answer ({type(cause).__name__}: {cause})")
        self.address = address


CONNECT_TIMEOUT_S = 5.0
"""How long a Jobs API request waits for its TCP connection (in-cluster, a live head answers in
milliseconds; a deleted pod's address never does)."""


@functools.cache
def _client_class() -> type:
    """`JobSubmissionClient` whose every request has a timeout and raises RayUnreachable when
    nothing answers (imported lazily: `ray` is heavy, and only the operator's Ray paths need it)."""
    from ray.job_submission import JobSubmissionClient

    class TimedJobSubmissionClient(JobSubmissionClient):  # type: ignore[misc]
        def __init__(self, address: str, *, timeout: tuple[float, float], **kwargs: Any) -> None:
            self._forgeline_timeout = timeout  # read by _do_request, which __init__ already calls
            super().__init__(address, **kwargs)

        def _do_request(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return super()._do_request(*args, **{"timeout": self._forgeline_timeout, **kwargs})
            except OSError as exc:  # requests' ConnectionError and Timeout are OSErrors
                raise RayUnreachable(self._address, exc) from exc

    return TimedJobSubmissionClient


def parse_records(text: str) -> list[dict[str, Any]]:
    """Every progress record in a chunk of Ray job log (worker prefixes and colours allowed)."""
    records = []
    for line in text.splitlines():
        at = line.find(PROGRESS_PREFIX)
        if at < 0:
            continue
        payload = _ANSI.sub("", line[at + len(PROGRESS_PREFIX) :]).strip()
        try:
            record = json.loads(payload)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def entrypoint(python: str = "python") -> str:
    """The Ray job's command: the trainer reads its typed config from an environment variable."""
    return f"{python} -m forgeline_trainer --config env:{CONFIG_ENV}"


_SUMMED = ("steps", "evaluation", "checkpointSave", "checkpointRestore", "stepsTimed")


def _restored(record: dict[str, Any]) -> bool:
    """Whether a worker group's ledger record shows it finished its checkpoint restore (the
    trainer adds `resumedFrom` then: a group that failed before, or inside, the restore has none)."""
    return "resumedFrom" in (record.get("ledger") or {})


def combine_ledgers(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One record for an attempt from its worker groups' latest ledger records, in the order the
    groups started: every group's seconds and timed steps summed (a group Ray Train replaced
    spent them too), the step the last one reached, the step the first group that finished its
    restore resumed from, and the steps each restored group computed again after the furthest
    step a group before it reached (`redoneSteps`, `redoneSeconds`: from its resume to there, at
    its own measured step time). A group that failed before or inside its restore (a worker
    group Ray Train replaced while a pod came back) resumed from nothing: its time counts, but
    not as a resume."""
    if not records:
        return None
    if len(records) == 1:
        return records[0]
    ordered = sorted(records, key=lambda r: float(r["ledger"].get("group") or 0))
    ledger: dict[str, Any] = {
        k: round(sum(float(r["ledger"].get(k) or 0) for r in ordered), 3) for k in _SUMMED
    }
    restored = [r for r in ordered if _restored(r)]
    if restored:
        ledger["resumedFrom"] = int(restored[0]["ledger"]["resumedFrom"])
    redone_steps, redone_seconds, furthest = 0, 0.0, None
    for r in ordered:
        if _restored(r) and furthest is not None:
            lost = max(0, furthest - int(r["ledger"]["resumedFrom"]))
            timed = float(r["ledger"].get("stepsTimed") or 0)
            per_step = float(r["ledger"].get("steps") or 0) / timed if timed else 0.0
            redone_steps, redone_seconds = redone_steps + lost, redone_seconds + lost * per_step
        if isinstance(r.get("step"), (int, float)):
            furthest = max(furthest or 0, int(r["step"]))
    ledger["redoneSteps"], ledger["redoneSeconds"] = redone_steps, round(redone_seconds, 3)
    steps = [r.get("step") for r in ordered if isinstance(r.get("step"), (int, float))]
    return {"type": "ledger", "step": max(steps) if steps else None, "ledger": ledger, "groups": len(ordered)}


@dataclass
class LogCursor:
    """Reads a job's log incrementally and keeps the latest of each record type (and the eval at
    step 0, the baseline, as type "baseline")."""

    offset: int = 0
    latest: dict[str, dict[str, Any]] = field(default_factory=dict)
    archived: int = -1
    """Length of the log when it was last archived (logarchive); -1: not yet by this operator."""
    first_progress: dict[str, Any] | None = None
    """The attempt's first progress record (goodput: its start-up ends there)."""
    ledgers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The latest record carrying the trainer's goodput ledger (progress, done, ledger), per
    worker group (Ray Train may restart the group within one Ray job: each keeps its own)."""

    @property
    def last_ledger(self) -> dict[str, Any] | None:
        """The attempt's ledger: its worker groups' latest ledgers summed (goodput.combine)."""
        return combine_ledgers(list(self.ledgers.values()))

    def feed(self, full_log: str) -> list[dict[str, Any]]:
        if len(full_log) < self.offset:  # log restarted (new submission)
            self.offset = 0
        chunk = full_log[self.offset :]
        cut = chunk.rfind("\n") + 1  # only complete lines
        self.offset += cut
        records = parse_records(chunk[:cut])
        for r in records:
            self.latest[r.get("type", "progress")] = r
            if r.get("type") == "eval" and r.get("step") == 0:
                self.latest["baseline"] = r  # the eval before training
            if r.get("type", "progress") == "progress" and self.first_progress is None:
                self.first_progress = r
            if isinstance(r.get("ledger"), dict):
                self.ledgers[str(r["ledger"].get("group", ""))] = r
        return records


class RayJobs:
    """A thin wrapper over `ray.job_submission.JobSubmissionClient`."""

    def __init__(
        self,
        address: str,
        python: str | None = None,
        request_timeout: float = 30.0,
        token: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_S,
    ) -> None:
        """token: the cluster's Ray auth token (sent as `Authorization: Bearer`). Pass it whenever
        it is known: Ray's own lookup (RAY_AUTH_TOKEN / token file) is cached per process, so a
        process that talks to two Ray clusters would send the first one's token to both.

        Every request, the SDK's version check in its constructor included, has a connect timeout
        (`connect_timeout`) and a read timeout (`request_timeout`): the SDK sends none, and a
        request to a deleted head pod's address waits for the kernel's TCP timeout (measured in
        tests/test_kube_faults.py: one reconcile held 73 s)."""
        self.address = address
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            self.client = _client_class()(
                address, headers=headers, timeout=(connect_timeout, request_timeout)
            )
        except RayUnreachable:
            raise
        except OSError as exc:  # the SDK's version check: ConnectionError when nothing answers
            raise RayUnreachable(address, exc) from exc
        self.python = python or "python"

    def submit(
        self,
        config: TrainingJobConfig | FineTuneJobConfig,
        submission_id: str,
        env: dict[str, str] | None = None,
        wait_for_agent: float = 0.0,
    ) -> str:
        """Submit the trainer; idempotent per submission id (a re-delivered submit finds the job).

        A fresh head may answer "No available agent" for a few seconds: retried for up to
        `wait_for_agent` seconds (the operator passes 0 and retries via kopf instead)."""
        existing = self.status(submission_id)
        if existing is not None:
            return submission_id
        env_vars = {
            CONFIG_ENV: dump_job_config(config),
            "PYTHONUNBUFFERED": "1",
            "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
            **(env or {}),
        }
        deadline = time.monotonic() + wait_for_agent
        while True:
            try:
                return self.client.submit_job(
                    entrypoint=entrypoint(self.python),
                    submission_id=submission_id,
                    runtime_env={"env_vars": env_vars},
                    metadata={
                        "forgeline.dev/job": config.name,
                        "forgeline.dev/namespace": config.namespace,
                        "forgeline.dev/kind": config.kind,
                    },
                )
            except RuntimeError as exc:
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def status(self, submission_id: str) -> str | None:
        """PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED — or None if Ray has no such job."""
        try:
            return str(self.client.get_job_status(submission_id).value)
        except RuntimeError as exc:  # the SDK raises RuntimeError for unknown ids
            if "does not exist" in str(exc) or "404" in str(exc):
                return None
            raise

    def info(self, submission_id: str) -> Any:
        return self.client.get_job_info(submission_id)

    def logs(self, submission_id: str) -> str:
        return self.client.get_job_logs(submission_id)

    def stop(self, submission_id: str) -> bool:
        try:
            return bool(self.client.stop_job(submission_id))
        except RuntimeError:
            return False

    def stop_and_wait(self, submission_id: str, timeout: float = 60.0) -> str:
        """Stop a Ray job and wait (bounded: a stop takes a few seconds to land) until it has
        ended; its final state (STOPPED for a job Ray no longer knows), or the last one seen."""
        state = self.status(submission_id) or "STOPPED"
        if state in TERMINAL_RAY_STATES:
            return state
        self.stop(submission_id)
        deadline = time.monotonic() + timeout
        while state not in TERMINAL_RAY_STATES and time.monotonic() < deadline:
            time.sleep(0.5)
            state = self.status(submission_id) or "STOPPED"
        return state

    def message(self, submission_id: str) -> str:
        """Ray's own message about a job (for a failed one: the entrypoint's exit and the end of
        its output), or "" when there is none or Ray cannot be asked."""
        try:
            return (self.info(submission_id).message or "").strip()
        except Exception:  # noqa: BLE001 - a best-effort detail of an already failed job
            return ""


def local_python() -> str:
    """The interpreter the embedded Ray runs the trainer with (this virtualenv's)."""
    return sys.executable
