"""A Ray Jobs API that does no training: the fault and load tests' stand-in for a Ray head.

It speaks the HTTP API that `ray.job_submission.JobSubmissionClient` (and so the operator's
`RayJobs`) uses — version, submit, status, logs, stop, list — and "runs" each submitted job on
the clock: `seconds_per_step` per optimizer step up to the job config's `maxSteps`, writing the
trainer's progress records into the job's log as the real trainer does. It lives in the test
process, so it outlives every operator the test kills, as a KubeRay cluster outlives its operator.

It keeps every submission (and every duplicate attempt to submit an existing id) for the tests
to count, and the running-jobs count at every moment, for the cap tests.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from forgeline_operator.api.jobconfig import PROGRESS_PREFIX, load_job_config
from forgeline_operator.rayclient.ports import free_port
from forgeline_operator.rayclient.rayjobs import CONFIG_ENV


@dataclass
class FakeJob:
    submission_id: str
    metadata: dict[str, str]
    steps: int
    interval: int
    submitted: float
    seconds_per_step: float
    stopped_at: float | None = None

    def elapsed_steps(self, now: float) -> int:
        end = self.stopped_at if self.stopped_at is not None else now
        return min(self.steps, int((end - self.submitted) / self.seconds_per_step))

    def status(self, now: float) -> str:
        if self.stopped_at is not None:
            return "STOPPED"
        return "SUCCEEDED" if self.elapsed_steps(now) >= self.steps else "RUNNING"

    def log(self, now: float) -> str:
        # the held-out eval before training and at the end, as the real trainer records them
        lines = [
            {"type": "event", "message": "training started", "start_step": 0},
            {"type": "eval", "step": 0, **_eval(5.0)},
        ]
        done = self.elapsed_steps(now)
        for step in range(1, done + 1):
            if step % 5 == 0 or step == self.steps:
                left = (self.steps - step) * self.seconds_per_step
                lines.append(
                    {"type": "progress", "step": step, "total_steps": self.steps, "loss": 5.0 / (1 + step)}
                    | {"eta_seconds": round(left, 3)}
                )
            if step % self.interval == 0 or step == self.steps:
                lines.append({"type": "checkpoint", "step": step})
        if self.status(now) == "SUCCEEDED":
            lines.append({"type": "eval", "step": self.steps, **_eval(5.0 / (1 + self.steps))})
            lines.append({"type": "finished", "output": "standin://", "checkpoint": None})
        return "".join(f"{PROGRESS_PREFIX}{json.dumps(r)}\n" for r in lines)


def _eval(loss: float) -> dict[str, float]:
    return {
        "eval_loss": loss,
        "eval_loss_ci95": 0.05,
        "perplexity": round(2.718281828**loss, 4),
        "eval_tokens": 4000.0,
    }


@dataclass
class RayJobsStandIn:
    seconds_per_step: float = 0.1
    port: int = field(default_factory=free_port)
    jobs: dict[str, FakeJob] = field(default_factory=dict)
    duplicate_submits: list[str] = field(default_factory=list)
    """Submission ids that were submitted again while they existed (the real Ray refuses those)."""
    max_running: int = 0
    """The most jobs RUNNING at once, sampled on every request and by a 20 ms ticker."""

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        self.server.daemon_threads = True
        self._stop = threading.Event()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RayJobsStandIn:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        threading.Thread(target=self._tick, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()

    def running(self) -> int:
        now = time.monotonic()
        with self.lock:
            return sum(j.status(now) == "RUNNING" for j in self.jobs.values())

    def _tick(self) -> None:
        while not self._stop.wait(0.02):
            self.max_running = max(self.max_running, self.running())

    def submissions_of(self, namespace: str, name: str) -> list[str]:
        with self.lock:
            return sorted(
                sid
                for sid, j in self.jobs.items()
                if j.metadata.get("forgeline.dev/namespace") == namespace
                and j.metadata.get("forgeline.dev/job") == name
            )

    # -- the API -------------------------------------------------------------------------------

    def submit(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        sid = body["submission_id"]
        config = load_job_config(body["runtime_env"]["env_vars"][CONFIG_ENV])
        steps = getattr(config.spec.training, "max_steps", None) or 20
        with self.lock:
            if sid in self.jobs:
                self.duplicate_submits.append(sid)
                return 400, {"error": f"Job with submission_id {sid} already exists."}
            self.jobs[sid] = FakeJob(
                sid,
                body.get("metadata") or {},
                steps,
                config.spec.checkpointing.interval_steps,
                time.monotonic(),
                self.seconds_per_step,
            )
        self.max_running = max(self.max_running, self.running())
        return 200, {"submission_id": sid, "job_id": sid}

    def details(self, job: FakeJob) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "type": "SUBMISSION",
            "job_id": job.submission_id,
            "submission_id": job.submission_id,
            "status": job.status(now),
            "entrypoint": "python -m forgeline_trainer --config env:FORGELINE_JOB_CONFIG",
            "message": "",
            "metadata": job.metadata,
        }

    def stop_job(self, sid: str) -> bool:
        with self.lock:
            job = self.jobs[sid]
            if job.status(time.monotonic()) != "RUNNING":
                return False
            job.stopped_at = time.monotonic()
            return True


def _handler(standin: RayJobsStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            return

        def _send(self, code: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _job(self) -> FakeJob | None:
            parts = self.path.rstrip("/").split("/")  # /api/jobs/<id>[/logs|/stop]
            sid = parts[3] if len(parts) > 3 else ""
            with standin.lock:
                job = standin.jobs.get(sid)
            if job is None:
                self._send(404, {"error": f"Job {sid} does not exist"})
            return job

        def do_GET(self) -> None:
            if self.path.startswith("/api/version"):
                return self._send(200, {"version": "3", "ray_version": "2.60.0", "ray_commit": "standin"})
            if self.path.rstrip("/") == "/api/jobs":
                with standin.lock:
                    jobs = list(standin.jobs.values())
                return self._send(200, [standin.details(j) for j in jobs])
            job = self._job()
            if job is None:
                return None
            if self.path.rstrip("/").endswith("/logs"):
                return self._send(200, {"logs": job.log(time.monotonic())})
            return self._send(200, standin.details(job))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path.rstrip("/") == "/api/jobs":
                return self._send(*standin.submit(body))
            job = self._job()
            if job is not None:
                self._send(200, {"stopped": standin.stop_job(job.submission_id)})
            return None

    return Handler
