"""Object storage for real: data, checkpoints and the model at `s3://` URIs on a local
S3-compatible server (moto in server mode, over HTTP), reached the way a pod reaches MinIO or S3.

The credentials and the endpoint are environment variables, as `spec.credentials` delivers them
to the Ray pods (envFrom a Secret): `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and
`AWS_ENDPOINT_URL`. They are set before the embedded Ray head starts, as a shell's are before
`forgeline run` starts its head: the head, the Ray job's driver and every Ray Train worker inherit
them. Every layer then talks to the same server: s3fs (data, publishing, `local_copy`) and
pyarrow's S3 filesystem (Ray Train's `storage_path`: checkpoints).
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from forgeline_operator.api import parse_job
from forgeline_operator.cli.runlocal import RunResult, run_job
from forgeline_operator.rayclient.localray import LocalRay
from forgeline_operator.rayclient.ports import free_port
from forgeline_operator.rayclient.rayjobs import RayJobs, local_python, parse_records

from .conftest import EXAMPLES

pytestmark = pytest.mark.trainer

BUCKET = "forgeline-it"


@dataclass
class S3Server:
    """moto's S3 in server mode on a loopback port; stop() and start() keep its buckets (moto's
    state lives in this process), so a test can take the endpoint away and bring it back."""

    port: int
    server: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def fs(self) -> Any:
        """A fresh s3fs client (no cached listings) on this server, with the environment's keys."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=self.endpoint)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    """The server, a bucket holding the example corpus, and the variables a Secret would give."""
    server = S3Server(free_port())
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "FL" + secrets.token_hex(8).upper(),
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        fs = server.fs()
        fs.mkdir(BUCKET)
        for name in ("corpus.jsonl", "corpus_eval.jsonl"):
            fs.put(str(EXAMPLES / "data" / name), f"{BUCKET}/data/{name}")
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def ray_head(s3: S3Server) -> Iterator[LocalRay]:
    """Started after the variables are set: the head, the Ray jobs and their workers see them."""
    with LocalRay() as head:
        yield head


Runner = Callable[..., RunResult]


@pytest.fixture(scope="module")
def run(ray_head: LocalRay, tmp_path_factory: pytest.TempPathFactory) -> Runner:
    jobs = RayJobs(ray_head.address, python=local_python(), token=ray_head.token)
    workdir = tmp_path_factory.mktemp("s3-work")
    console = Console(file=open(os.devnull, "w"), force_terminal=False)  # noqa: SIM115

    def _run(job: Any, *, expect_ok: bool = True, **kw: Any) -> RunResult:
        result = run_job(job, jobs, console, output=None, done={}, work_dir=str(workdir), quiet=True, **kw)
        if expect_ok and not result.ok:
            log = "\n".join(jobs.logs(result.submission_id).splitlines()[-60:])
            pytest.fail(f"{job.metadata.name} {result.status}:\n{log}")
        return result

    _run.jobs = jobs  # type: ignore[attr-defined]
    return _run


def _s3_job(name: str, max_steps: int = 20, interval: int = 10) -> Any:
    """The tiny llama with everything in the bucket: data, eval data, checkpoints, output."""
    doc = yaml.safe_load((EXAMPLES / "pretrain-tiny-llama.yaml").read_text())
    spec = doc["spec"]
    doc["metadata"]["name"] = name
    spec["data"]["sources"] = [{"uri": f"s3://{BUCKET}/data/corpus.jsonl", "format": "jsonl"}]
    spec["evaluation"]["sources"] = [{"uri": f"s3://{BUCKET}/data/corpus_eval.jsonl"}]
    spec["evaluation"]["intervalSteps"] = interval
    spec["training"].update(maxSteps=max_steps, warmupSteps=2)
    spec["checkpointing"] = {"intervalSteps": interval, "keep": 2, "storage": f"s3://{BUCKET}/checkpoints"}
    spec["output"]["uri"] = f"s3://{BUCKET}/models/{name}"
    return parse_job(doc)


def _checkpoint_files(s3: S3Server, name: str) -> list[str]:
    return [p for p in s3.fs().find(f"{BUCKET}/checkpoints") if f"/local-{name}-" in p]


def test_pretraining_in_s3_resumes_from_its_checkpoint_and_publishes_there(
    run: Runner, s3: S3Server, tmp_path: Path
) -> None:
    """Data, eval data, checkpoints and output all in the bucket. Attempt 0 fails right after
    its step-10 checkpoint (no worker retries): the checkpoint is in the bucket. Attempt 1, a new
    Ray job, resumes from it at step 10, finishes, and publishes a model that loads back from the
    bucket. (One job for both halves: each run of the tiny model costs ~40 s of the suite.)"""
    t0 = time.monotonic()
    job = _s3_job("tiny-llama-s3")
    failed = run(job, fail_at_step=10, max_worker_failures=0, expect_ok=False)
    assert failed.status == "FAILED"
    assert any(r.get("message") == "data ready" for r in failed.records)  # read from the bucket
    assert any(r["type"] == "checkpoint" and r["step"] == 10 for r in failed.records)
    assert [p for p in _checkpoint_files(s3, "tiny-llama-s3") if p.endswith("/state.pt")]
    assert not s3.fs().exists(f"{BUCKET}/models/tiny-llama-s3/config.json")
    t1 = time.monotonic()

    resumed = run(job, attempt=1)
    events = [r for r in resumed.records if r.get("message") == "resumed from checkpoint"]
    assert events and events[0]["step"] == 10
    assert resumed.last("done")["step"] == 20
    # Ray Train kept the newest `keep` (2) checkpoints in the bucket: steps 10 and 20.
    states = [p for p in _checkpoint_files(s3, "tiny-llama-s3") if p.endswith("/state.pt")]
    assert len(states) == 2, _checkpoint_files(s3, "tiny-llama-s3")
    # The model was published there, and loads back through the trainer's own local_copy.
    model_dir = f"{BUCKET}/models/tiny-llama-s3"
    published = {Path(p).name for p in s3.fs().find(model_dir)}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json", "loss.png"):
        assert name in published, (name, published)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forgeline_trainer.storage import local_copy

    local = local_copy(f"s3://{model_dir}", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(local)
    tok = AutoTokenizer.from_pretrained(local)
    ids = model.generate(**tok("The cat", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert ids.shape[1] > 2
    print(f"\nattempt 0 (failed after the step-10 checkpoint): {t1 - t0:.1f} s; attempt 1 (resumed at 10, ")
    print(f"published, reloaded): {time.monotonic() - t1:.1f} s")


@pytest.mark.timeout(420)
def test_storage_lost_mid_run_fails_typed_not_silently(run: Runner, s3: S3Server) -> None:
    """The S3 server stops right after the first checkpoint and stays away: the job fails (no
    hang, no success without its checkpoints and model) with the trainer's `error` record, reason
    `StorageError`, naming the endpoint or the bucket."""
    job = _s3_job("tiny-llama-s3-lost", max_steps=2000, interval=10)
    submitted: list[str] = []
    stopped: dict[str, float] = {}

    def _stop_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            log = run.jobs.logs(submitted[0]) if submitted else ""  # type: ignore[attr-defined]
            if any(r.get("type") == "checkpoint" for r in parse_records(log)):
                s3.stop()
                stopped["at"] = time.monotonic()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=_stop_after_first_checkpoint, daemon=True)
    watcher.start()
    try:
        result = run(job, expect_ok=False, submitted=submitted)
        ended = time.monotonic()
    finally:
        watcher.join(timeout=5)
        if s3.server is None:
            s3.start()  # back for the module's other tests
    assert "at" in stopped, "the server was never stopped"
    assert result.status == "FAILED", result.status
    errors = [r for r in result.records if r["type"] == "error"]
    assert errors, [r for r in result.records if r["type"] != "progress"]
    print(f"\nS3 stopped after the first checkpoint: the job failed {ended - stopped['at']:.1f} s later")
    print(f"error record: {errors[-1]}")
    # StorageError from the write that failed; or, when Ray Train restarted the worker group first
    # (its own checkpoint upload failed, untyped), the restarted workers' preflight names the store
    last = errors[-1]
    assert last.get("reason") == "StorageError" or (
        last.get("reason") == "PreflightFailed" and "'checkpoint storage'" in last["message"]
    ), last
    assert s3.endpoint.split("//")[1] in last["message"] or BUCKET in last["message"]


def test_forgeline_run_names_the_object_store_it_will_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """`forgeline run` hands its shell's environment to the embedded Ray head (as the fixtures
    above do) and says which endpoint `s3://` URIs go to — never a key."""
    from forgeline_operator.cli.runlocal import _object_store_notes

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.example:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIACANARY0000000000")
    (note,) = _object_store_notes([_s3_job("tiny-llama-s3")], None)
    assert "tiny-llama-s3: s3:// URIs go to http://minio.example:9000" in note
    assert "AKIACANARY" not in note
    (remote,) = _object_store_notes([_s3_job("tiny-llama-s3")], "http://ray:8265")
    assert "the Ray cluster at http://ray:8265" in remote
    plain = parse_job(yaml.safe_load((EXAMPLES / "pretrain-tiny-llama.yaml").read_text()))
    assert _object_store_notes([plain], None) == []
    assert "--output" in _object_store_notes([plain], None, "s3://b/out")[0]


def test_an_unreachable_object_store_is_a_storage_error() -> None:
    """In each layer's own words: pyarrow (Ray Train's checkpoints) and botocore (s3fs)."""
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    from forgeline_trainer.errors import reason_for

    pyarrow_says = OSError(
        "When initiating multiple part upload for key 'ck/state.pt' in bucket 'b': AWS Error "
        "NETWORK_CONNECTION during CreateMultipartUpload operation: curlCode: 7, Could not connect to server"
    )
    assert reason_for(pyarrow_says) == "StorageError"
    assert reason_for(EndpointConnectionError(endpoint_url="http://minio:9000/b")) == "StorageError"
    # one that accepts connections and never answers: measured 100 s (pyarrow), 412 s (s3fs)
    assert reason_for(ReadTimeoutError(endpoint_url="http://minio:9000/b")) == "StorageError"
    assert reason_for(OSError("some other failure")) is None
