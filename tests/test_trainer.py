"""The trainer, for real: tiny models train on CPU with two Ray Train workers on an embedded Ray.

Every runnable example goes through the same submit-and-track code as `forgeline run`
(`runlocal.run_job` → Ray Jobs API → `python -m forgeline_trainer`), and its loss must fall.
Outputs land in a per-session work directory whose `examples/` links to the repository's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from forgeline_operator.api import parse_job
from forgeline_operator.cli.runlocal import RunResult, run_job
from forgeline_operator.rayclient.localray import LocalRay
from forgeline_operator.rayclient.rayjobs import RayJobs, local_python, parse_records

from .conftest import EXAMPLES, tmpfs

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def ray_head() -> Iterator[LocalRay]:
    with LocalRay() as head:
        yield head


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("trainer-work")
    (d / "examples").symlink_to(EXAMPLES)
    return d


Runner = Callable[..., tuple[RunResult, dict[str, Any]]]


@pytest.fixture(scope="module")
def run(ray_head: LocalRay, workdir: Path) -> Runner:
    """Run an example (by file stem) or a parsed job; cached per job name for dependants."""
    jobs = RayJobs(ray_head.address, python=local_python(), token=ray_head.token)
    done: dict[str, RunResult] = {}
    console = Console(file=open(os.devnull, "w"), force_terminal=False)  # noqa: SIM115

    def _run(
        example: str | None = None, job: Any = None, *, cache: bool = True, expect_ok: bool = True, **kw: Any
    ):
        if job is None:
            job = parse_job(yaml.safe_load((EXAMPLES / f"{example}.yaml").read_text()))
        name = job.metadata.name
        if cache and name in done and not kw:
            result = done[name]
        else:
            result = run_job(
                job,
                jobs,
                console,
                output=kw.pop("output", None),
                done=done,
                work_dir=str(workdir),
                quiet=True,
                **kw,
            )
        metrics_path = workdir / result.output / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if result.ok and metrics_path.exists() else {}
        if expect_ok and not result.ok:
            log = "\n".join(jobs.logs(result.submission_id).splitlines()[-60:])
            pytest.fail(f"{name} {result.status}:\n{log}")
        return result, metrics

    return _run


def _assert_learned(metrics: dict[str, Any], factor: float = 0.8) -> None:
    assert metrics["world_size"] == 2
    assert metrics["final_loss"] < factor * metrics["first_loss"], (
        f"loss did not fall enough: {metrics['first_loss']:.4f} -> {metrics['final_loss']:.4f}"
    )


# -- pretraining -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "example,stage",
    [
        # ZeRO-2 in make soak: ZeRO-3 takes every path ZeRO-2 does and more (partitioned weights,
        # the offloaded optimizer), and the suite must fit its 45 minutes
        pytest.param("pretrain-tiny-gpt2-zero2", 2, marks=pytest.mark.soak),
        ("pretrain-tiny-llama-zero3", 3),
    ],
)
def test_deepspeed_zero_pretraining(run: Runner, example: str, stage: int) -> None:
    stale = None
    if stage == 3:
        # ZeRO-3 offloads the optimizer to DeepSpeed's JIT-built CPU Adam. A build killed half-way
        # (a stopped job, a timed-out test) leaves torch's bare lock file behind, and DeepSpeed used
        # to wait on it for ever at initialize: one is planted here, as a killed build leaves it.
        from torch.utils.cpp_extension import _get_build_directory

        stale = Path(_get_build_directory("cpu_adam", verbose=False)) / "lock"
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.touch()
    _, metrics = run(example)
    assert metrics["deepspeed_zero_stage"] == stage
    _assert_learned(metrics)
    if stale is not None:
        assert not stale.exists()


def test_mixture_of_experts(run: Runner) -> None:
    _, metrics = run("pretrain-tiny-mixtral-moe")
    assert metrics["architecture"] == "mixtral"
    _assert_learned(metrics)
    # the example trains with Adafactor: a row and a column per matrix, not AdamW's 8 bytes a weight
    assert metrics["optimizer"] == "adafactor"
    assert 0 < metrics["optimizer_state_bytes"] < 0.05 * 8 * metrics["parameters"]


def test_masked_language_model(run: Runner, workdir: Path) -> None:
    _, metrics = run("pretrain-tiny-bert-mlm")
    assert metrics["architecture"] == "bert" and metrics["objective"] == "masked"
    _assert_learned(metrics)
    from transformers import AutoModelForMaskedLM

    assert AutoModelForMaskedLM.from_pretrained(workdir / "runs/tiny-bert-mlm") is not None


def test_continued_pretraining_starts_from_the_base(run: Runner, workdir: Path) -> None:
    _, base = run("pretrain-tiny-llama")
    _, metrics = run("continued-pretrain-tiny")
    # It starts where the base model ended, not from a random model's ~ln(vocab).
    assert metrics["first_loss"] < 0.6 * base["first_loss"]
    assert metrics["tokenizer"].endswith("runs/tiny-llama")
    # its lineage record reaches back to the pretraining's, whose output digest it checked against
    out = workdir / "runs/tiny-llama-continued"
    rec = json.loads((out / "lineage.json").read_text())
    base_origin = rec["inputs"]["baseModel"]
    upstream = base_origin["upstream"]
    assert upstream == json.loads((workdir / "runs/tiny-llama/lineage.json").read_text())
    assert base_origin["digest"] == upstream["output"]["digest"] == _digest(workdir / "runs/tiny-llama")
    assert rec["output"]["digest"] == _digest(out) and rec["job"]["name"] == "tiny-llama-continued"
    corpus = (EXAMPLES / "data/corpus.txt").read_bytes()
    (data,) = rec["inputs"]["data"]
    assert data["bytes"] == len(corpus) and data["files"] == 1
    listing = f"corpus.txt {hashlib.sha256(corpus).hexdigest()}\n"
    assert data["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert rec["evals"]["before"]["eval_loss"] > rec["evals"]["after"]["eval_loss"]
    assert rec["goodputLedger"]["steps"] > 0 and rec["versions"]["torch"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "model-index:" in card and "tiny-llama-continued" in card


def _digest(out: Path) -> dict[str, Any]:
    from forgeline_trainer.lineage import digest_dir

    return digest_dir(out)


# -- fine-tuning -------------------------------------------------------------------------------


def _reload_matches_probe(out: Path, base: Path, quantized: bool = False) -> None:
    """Base model + saved adapter reproduce the logits the trained model produced."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    probe = load_file(str(out / "probe.safetensors"))
    kwargs: dict[str, Any] = {}
    if quantized:
        kwargs = {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
            ),
            "device_map": {"": "cpu"},
        }
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **kwargs), out).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits[:, -probe["input_ids"].shape[1] :, :]
    torch.testing.assert_close(logits.float(), probe["logits"], atol=2e-3, rtol=1e-3)
    untouched = AutoModelForCausalLM.from_pretrained(base, **kwargs).eval()
    with torch.no_grad():
        base_logits = untouched(input_ids=probe["input_ids"]).logits
    assert not torch.allclose(base_logits.float(), probe["logits"], atol=1e-2), "the adapter changed nothing"


def test_lora_trains_only_adapters_and_reloads(run: Runner, workdir: Path) -> None:
    run("pretrain-tiny-llama")
    result, metrics = run("finetune-lora-tiny")
    _assert_learned(metrics)
    # the holdout is sized in response tokens (holdoutMinTokens 2,000), evaluated before and after
    final, initial = metrics["final_eval"], metrics["initial_eval"]
    assert (
        final["eval_tokens"] >= 2000
        and 0 < final["eval_loss_ci95"] < 0.5
        and 0 < final["accuracy_ci95"] < 0.05
    )
    assert initial["step"] == 0 and initial["eval_tokens"] == final["eval_tokens"]
    assert final["accuracy"] > initial["accuracy"] + 2 * final["accuracy_ci95"]
    assert not [r for r in result.records if "too small to trust" in str(r.get("message"))]
    assert 0 < metrics["trainable_fraction"] < 0.15
    out = workdir / "runs/tiny-sft-lora"
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    assert metrics["final_eval"]["accuracy"] > 0.3
    _reload_matches_probe(out, workdir / "runs/tiny-llama")


def test_qlora_base_is_4bit_and_adapter_reloads(run: Runner, workdir: Path) -> None:
    run("pretrain-tiny-llama")
    _, metrics = run("finetune-qlora-tiny")
    _assert_learned(metrics)
    assert metrics["quantized_4bit_layers"] >= 14  # every linear layer of 2 blocks is Linear4bit
    assert 0 < metrics["trainable_fraction"] < 0.2
    # bitsandbytes' 8-bit AdamW on the CPU path; its state, measured, is what --fit estimates
    # (every adapter of this tiny model is under 4,096 values, so bitsandbytes keeps it in 32 bits)
    from forgeline_operator.sizing import fit

    job = parse_job(yaml.safe_load((EXAMPLES / "finetune-qlora-tiny.yaml").read_text()))
    base_config = json.loads((workdir / "runs/tiny-llama/config.json").read_text())
    estimate = fit.estimate(job, None, model_config=base_config)
    assert metrics["optimizer"] == "adamw-8bit" and metrics["adapter_dtype"] == "float32"
    assert metrics["optimizer_state_bytes"] == pytest.approx(estimate.optimizer_states, rel=0.02, abs=4096)
    record = json.loads((workdir / "runs/tiny-sft-qlora/lineage.json").read_text())
    assert record["training"]["optimizer"] == "adamw-8bit"
    _reload_matches_probe(workdir / "runs/tiny-sft-qlora", workdir / "runs/tiny-llama", quantized=True)


def test_full_finetune_trains_everything(run: Runner) -> None:
    run("pretrain-tiny-llama")
    _, metrics = run(job=_full_finetune_with_a_dead_mlflow())
    assert metrics["trainable_fraction"] == 1.0 and metrics["saved"] == "full"
    _assert_learned(metrics)


@functools.cache
def _full_finetune_with_a_dead_mlflow() -> Any:
    """The full fine-tuning example, told to log to an MLflow server that is not there (the
    MLflow check below rides on this job: one job less in the suite)."""
    from forgeline_operator.rayclient.ports import free_port

    doc = yaml.safe_load((EXAMPLES / "finetune-full-tiny.yaml").read_text())
    doc["spec"]["mlflow"] = {"trackingUri": f"http://127.0.0.1:{free_port()}"}
    return parse_job(doc)


def test_prompt_tuning_trains_only_virtual_tokens(run: Runner, workdir: Path) -> None:
    run("pretrain-tiny-llama")
    _, metrics = run("finetune-prompt-tuning-tiny")
    assert metrics["trainable_parameters"] == 16 * 64  # 16 virtual tokens × hidden size 64
    _assert_learned(metrics, factor=0.9)
    assert (workdir / "runs/tiny-prompt-tuning/adapter_config.json").exists()


# -- RLHF --------------------------------------------------------------------------------------


def test_reward_model_learns_preferences(run: Runner) -> None:
    run("pretrain-tiny-llama")
    _, metrics = run("reward-model-tiny")
    _assert_learned(metrics)
    # the TRL recipes take the spec's optimizer too (optim=adamw_bnb_8bit)
    assert metrics["optimizer"] == "adamw-8bit"
    assert metrics["optimizer_class"] == "bitsandbytes.optim.adamw.AdamW"
    assert metrics["final_eval"]["preference_accuracy"] > 0.6
    assert metrics["final_eval"]["reward_margin"] > metrics["initial_eval"]["reward_margin"] + 0.5


def test_dpo_raises_the_preference_margin(run: Runner) -> None:
    run("pretrain-tiny-llama")
    _, metrics = run("dpo-tiny")
    # before training the policy is the reference: every pair a tie, said so, counted half
    assert metrics["initial_eval"]["preference_ties"] == 1.0
    assert metrics["initial_eval"]["preference_accuracy"] == 0.5
    assert metrics["final_eval"]["preference_accuracy"] > 0.5
    assert "preference_ties" not in metrics["final_eval"]
    assert metrics["final_eval"]["reward_margin"] > metrics["initial_eval"]["reward_margin"]
    assert metrics["final_eval"]["eval_loss"] < metrics["initial_eval"]["eval_loss"]


def test_grpo_runs_with_the_reward_model(run: Runner, workdir: Path) -> None:
    run("pretrain-tiny-llama")
    run("reward-model-tiny")
    result, metrics = run("grpo-tiny")
    assert metrics["method"] == "grpo" and metrics["steps"] == 10
    assert isinstance(metrics["final_eval"]["mean_reward"], float)
    assert any("rewards" in k or "reward" in k for r in result.records if r["type"] == "progress" for k in r)
    assert (workdir / "runs/tiny-grpo/adapter_config.json").exists()


# -- MLflow --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server on loopback (SQLite backend, artifacts on disk), as a team's
    registry would run it; `tests/setup/install_tools.sh` installs it."""
    import urllib.request

    from forgeline_operator.dev.cluster.binaries import find_binary
    from forgeline_operator.rayclient.ports import free_port

    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(d / "server.log", "wb")  # noqa: SIM115 - lives with the process
    argv = [find_binary("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    argv += [
        "--backend-store-uri",
        f"sqlite:///{d}/mlflow.db",
        "--artifacts-destination",
        str(d / "artifacts"),
    ]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start: {(d / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def _mlflow_job(name: str, server: str, **promotion: Any) -> Any:
    training = yaml.safe_load((EXAMPLES / "pretrain-tiny-llama.yaml").read_text())["spec"]["training"]
    return _variant(
        "pretrain-tiny-llama",
        name,
        training={**training, "maxSteps": 12},
        promotion=promotion,
        mlflow={"trackingUri": server, "experiment": "forgeline-tests", "registeredModel": "tiny-llama"},
    )


def test_a_promoted_output_becomes_a_registered_version_and_an_unpromoted_one_does_not(
    run: Runner, workdir: Path, mlflow_server: str
) -> None:
    """Two real jobs log to a real MLflow server: the one its gate promotes is version 1 of the
    registered model, tagged with its job, namespace and lineage digest, alias `promoted`, its
    files uploaded (a local output: nobody else could read it); its run's metrics are the job's.
    The one its gate does not promote is logged, says so, and registers nothing."""
    from mlflow import MlflowClient

    result, metrics = run(
        job=_mlflow_job("tiny-llama-mlflow", mlflow_server, metric="perplexity"), cache=False
    )
    assert metrics["promotion"]["promoted"] is True, metrics["promotion"]
    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias("tiny-llama", "promoted")
    out = workdir / "runs/tiny-llama-mlflow"
    from forgeline_trainer.lineage import digest

    assert version.version == "1" and version.source == f"runs:/{version.run_id}/model"
    assert version.tags == {
        "forgeline.job": "tiny-llama-mlflow",
        "forgeline.namespace": "default",
        "forgeline.lineage_digest": digest(json.loads((out / "lineage.json").read_text())),
        "forgeline.output": "runs/tiny-llama-mlflow",
    }
    logged = {a.path for a in client.list_artifacts(version.run_id, "model")}
    assert {"model/config.json", "model/model.safetensors", "model/lineage.json", "model/README.md"} <= logged
    mlrun = client.get_run(version.run_id)
    final = metrics["final_eval"]
    assert mlrun.data.metrics["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-5)
    assert mlrun.data.metrics["before/eval_loss"] == pytest.approx(
        metrics["initial_eval"]["eval_loss"], rel=1e-5
    )
    assert mlrun.data.metrics["loss"] == pytest.approx(metrics["final_loss"], rel=1e-4)
    history = client.get_metric_history(version.run_id, "loss")
    assert max(m.step for m in history) == 12 and len(history) >= 2
    assert mlrun.data.params["training.maxSteps"] == "12" and mlrun.data.tags["forgeline.promoted"] == "true"
    assert mlrun.info.status == "FINISHED"
    assert any(r.get("message", "").startswith("registered as tiny-llama version 1") for r in result.records)
    # the same registered model, a gate that cannot pass: logged, said, not registered
    result, metrics = run(
        job=_mlflow_job("tiny-llama-mlflow-unmet", mlflow_server, metric="eval_loss", threshold=0.01),
        cache=False,
    )
    assert metrics["promotion"]["promoted"] is False
    assert [v.version for v in client.search_model_versions("name='tiny-llama'")] == ["1"]
    unmet = client.search_runs(
        [client.get_experiment_by_name("forgeline-tests").experiment_id],
        filter_string="tags.`forgeline.job` = 'tiny-llama-mlflow-unmet'",
    )
    assert len(unmet) == 1 and unmet[0].data.tags["forgeline.promoted"] == "false"
    assert any("not registered as a version of tiny-llama" in r.get("message", "") for r in result.records)


def test_an_mlflow_server_that_cannot_be_reached_never_fails_the_job(run: Runner) -> None:
    run("pretrain-tiny-llama")
    job = _full_finetune_with_a_dead_mlflow()  # the full fine-tune's run (cached by its name)
    result, metrics = run(job=job)
    nowhere = job.spec.mlflow.tracking_uri
    assert result.ok and metrics["steps"] == job.spec.training.max_steps
    warned = [
        r for r in result.records if r.get("type") == "event" and "could not be used" in r.get("message", "")
    ]
    assert len(warned) == 1 and warned[0]["message"].startswith(f"MLflow at {nowhere} could not be used"), (
        warned
    )


# -- checkpoints, resume, failures ---------------------------------------------------------------


def _variant(example: str, name: str, **spec_updates: Any) -> Any:
    doc = yaml.safe_load((EXAMPLES / f"{example}.yaml").read_text())
    doc["metadata"]["name"] = name
    doc["spec"]["output"]["uri"] = f"runs/{name}"
    doc["spec"].update(spec_updates)
    return parse_job(doc)


def _workers(head: LocalRay) -> list[Any]:
    """The Ray Train worker processes of this Ray head (psutil.Process), known by its token in
    their environment (as LocalRay.stop knows them): a signal must never reach another Ray."""
    import psutil

    def _ours(p: psutil.Process) -> bool:
        try:
            return p.environ().get("RAY_AUTH_TOKEN") == head.token
        except psutil.Error:
            return False

    procs = psutil.process_iter(["cmdline"])
    return [p for p in procs if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and _ours(p)]


def _when(jobs: RayJobs, submitted: list[str], ready: Callable[[list[dict[str, Any]]], bool], act) -> Any:
    """A thread that acts once the submitted Ray job's progress records satisfy `ready`."""
    import threading

    def _watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            records = parse_records(jobs.logs(submitted[0])) if submitted else []
            if records and ready(records):
                act(records)
                return
            time.sleep(0.1)

    thread = threading.Thread(target=_watch, daemon=True)
    thread.start()
    return thread


def _training(records: list[dict[str, Any]]) -> bool:
    """Training has begun (and a moment has passed: a signal then lands between steps)."""
    if any(r["type"] == "event" and r["message"] == "training started" for r in records):
        time.sleep(0.5)
        return True
    return False


def _starts(records: list[dict[str, Any]]) -> list[int]:
    return [
        i for i, r in enumerate(records) if r.get("type") == "event" and r["message"] == "training started"
    ]


@pytest.mark.soak  # every suite: a real worker pod's Ray node killed, resumed from the newest checkpoint
# in storage (tests/test_kube_faults.py: the same restore, through the operator's resubmission)
def test_a_killed_worker_restores_from_the_last_checkpoint(run: Runner, ray_head: LocalRay) -> None:
    """A real fault: SIGKILL one Ray Train worker process mid-training. Ray Train restarts the
    worker group within the same Ray job and training resumes from the newest checkpoint written
    to storage (not merely the newest Ray Train's controller had registered: it collects reported
    checkpoints only every 2 s), then finishes. Steps redone ≤ one checkpoint interval."""
    training = yaml.safe_load((EXAMPLES / "pretrain-tiny-llama.yaml").read_text())["spec"]["training"]
    job = _variant(
        "pretrain-tiny-llama",
        "tiny-llama-killed",
        checkpointing={"intervalSteps": 20, "keep": 2},
        training={**training, "maxSteps": 200},
    )
    jobs = RayJobs(ray_head.address, token=ray_head.token)
    submitted: list[str] = []
    seen: dict[str, Any] = {}

    def _kill(records: list[dict[str, Any]]) -> None:
        victim = _workers(ray_head)[0]
        seen.update(checkpoint=[r["step"] for r in records if r["type"] == "checkpoint"][-1], pid=victim.pid)
        victim.send_signal(signal.SIGKILL)

    killer = _when(
        jobs, submitted, lambda rs: any(r["type"] == "checkpoint" and r["step"] >= 40 for r in rs), _kill
    )
    result, metrics = run(job=job, cache=False, submitted=submitted)
    killer.join(timeout=10)
    assert "pid" in seen, "the worker was never killed"
    starts = _starts(result.records)
    assert len(starts) == 2, "the worker group did not restart"
    resumed = result.records[starts[1]]["start_step"]
    written = [r["step"] for r in result.records[: starts[1]] if r.get("type") == "checkpoint"]
    assert resumed == max(written) >= seen["checkpoint"], (resumed, written)
    done = [r["step"] for r in result.records[: starts[1]] if r.get("type") == "progress"]
    assert max(done, default=0) - resumed <= 20, (done, resumed)  # steps redone ≤ one interval
    # goodput counts as redone what it knows was done again: from the resume to the last step the
    # first group recorded (a killed rank 0 writes no ledger: its last progress record is all there is)
    ledgers = [r for r in result.records if isinstance(r.get("ledger"), dict)]
    recorded = max(r["step"] for r in ledgers if r["ledger"]["group"] == ledgers[0]["ledger"]["group"])
    split = result.goodput()
    assert split["redoneSteps"] == max(0, recorded - resumed), (split, recorded, resumed)
    assert (split["seconds"]["redone"] > 0) == (recorded > resumed), split
    assert split["seconds"]["checkpointRestore"] > 0 and split["seconds"]["checkpointSave"] > 0, split
    assert metrics["steps"] == 200 and metrics["final_loss"] < metrics["first_loss"]
    print(
        f"\nworker SIGKILLed after checkpoint {seen['checkpoint']} was written; newest written before "
        f"the restart: {max(written)}; resumed at step {resumed}"
    )


@pytest.mark.soak  # every suite: SIGTERM → checkpoint at the step → Preempted (just below), and real
# pods deleted and evicted resuming at exactly their step (tests/test_kube_faults.py)
def test_sigterm_checkpoints_at_the_current_step_and_the_restart_resumes_there(
    run: Runner, ray_head: LocalRay
) -> None:
    """Graceful preemption, for real: SIGTERM to one Ray Train worker process between checkpoint
    intervals. Every worker finishes the step, a checkpoint is written at exactly that step, the
    workers stop with Preempted, Ray Train restarts the worker group, which resumes at that step
    and finishes. (Ray's own SIGTERM handler would have ended the process at once.)"""
    training = yaml.safe_load((EXAMPLES / "pretrain-tiny-llama.yaml").read_text())["spec"]["training"]
    job = _variant(
        "pretrain-tiny-llama",
        "tiny-llama-sigterm",
        checkpointing={"intervalSteps": 1000, "keep": 2},  # no interval checkpoint before the last step
        training={**training, "maxSteps": 300},
    )
    jobs = RayJobs(ray_head.address, token=ray_head.token)
    submitted: list[str] = []
    seen: dict[str, Any] = {}

    def _terminate(records: list[dict[str, Any]]) -> None:
        victim = _workers(ray_head)[-1]
        seen.update(pid=victim.pid, at=time.monotonic())
        victim.send_signal(signal.SIGTERM)

    thread = _when(jobs, submitted, _training, _terminate)
    result, metrics = run(job=job, cache=False, submitted=submitted, max_worker_failures=1)
    thread.join(timeout=10)
    assert "pid" in seen, "no worker was signalled"
    records = result.records
    preempted = [r for r in records if r["type"] == "event" and r["message"].startswith("preempted")]
    assert len(preempted) == 1, jobs.logs(submitted[0])[-6000:]
    step = preempted[0]["step"]
    assert 0 < step < 300, step  # not an interval checkpoint: one made for the signal
    assert any(r["type"] == "checkpoint" and r["step"] == step for r in records)
    assert preempted[0]["seconds_to_checkpoint"] < preempted[0]["grace_period_seconds"]
    starts = _starts(records)
    assert len(starts) == 2 and records[starts[1]]["start_step"] == step
    assert metrics["steps"] == 300 and metrics["resumed_from_step"] == step
    # goodput: the checkpoint written for the signal, and the restore, are counted as such (the
    # restarted worker group keeps a ledger of its own; the attempt sums both)
    split = result.goodput()["seconds"]
    assert split["checkpointSave"] > 0 and split["checkpointRestore"] > 0 and split["productive"] > 0, split
    groups = {r["ledger"]["group"] for r in records if isinstance(r.get("ledger"), dict)}
    assert len(groups) == 2, groups
    print(
        f"\nSIGTERM to worker pid {seen['pid']}: checkpoint at step {step} "
        f"{preempted[0]['seconds_to_checkpoint']} s after the signal; restarted at step {step}"
    )


@pytest.mark.soak  # every suite: real pods deleted and evicted → Preempted, checkpoint at the step
# (tests/test_kube_faults.py); the SIGTERM handler itself: test_trainer_units
def test_a_preempted_ray_job_fails_with_reason_preempted(run: Runner, ray_head: LocalRay) -> None:
    """With no worker restarts left the Ray job fails; its error record says Preempted (the operator
    resubmits it without counting it against backoffLimit; the resubmission resumes like the
    restart above), and the checkpoint at the signalled step is there."""
    training = yaml.safe_load((EXAMPLES / "pretrain-tiny-llama.yaml").read_text())["spec"]["training"]
    job = _variant(
        "pretrain-tiny-llama",
        "tiny-llama-sigterm-job",
        checkpointing={"intervalSteps": 1000, "keep": 2},
        training={**training, "maxSteps": 300},
    )
    jobs = RayJobs(ray_head.address, token=ray_head.token)
    submitted: list[str] = []
    thread = _when(jobs, submitted, _training, lambda _: _workers(ray_head)[0].send_signal(signal.SIGTERM))
    failed, _ = run(job=job, cache=False, submitted=submitted, max_worker_failures=0, expect_ok=False)
    thread.join(timeout=10)
    assert failed.status == "FAILED"
    errors = [r for r in failed.records if r["type"] == "error"]
    assert errors and errors[0]["reason"] == "Preempted", errors
    events = [r for r in failed.records if r["type"] == "event" and r["message"].startswith("preempted")]
    assert any(r["type"] == "checkpoint" and r["step"] == events[0]["step"] for r in failed.records)


@pytest.mark.soak  # the TRL callback's path runs in every suite: test_trainer_units, a real Trainer
def test_sigterm_in_dpo_checkpoints_at_that_step_and_the_resubmission_resumes_there(
    run: Runner, ray_head: LocalRay
) -> None:
    """The TRL recipes too (hf_trainer.PreemptionCallback): SIGTERM to one Ray Train worker of a
    DPO run after its first step. Both workers finish the step, the Trainer's checkpoint at exactly
    that step is reported, the Ray job (no worker restarts left) fails with reason Preempted; the
    resubmission (a new Ray job) resumes at that step from storage and finishes."""
    run("pretrain-tiny-llama")  # the base model (cached)
    training = yaml.safe_load((EXAMPLES / "dpo-tiny.yaml").read_text())["spec"]["training"]
    job = _variant(
        "dpo-tiny",
        "tiny-dpo-sigterm",
        checkpointing={"intervalSteps": 1000, "keep": 2},  # no interval checkpoint before the last step
        training={**training, "maxSteps": 12},
    )
    jobs = RayJobs(ray_head.address, token=ray_head.token)
    submitted: list[str] = []
    seen: dict[str, Any] = {}

    def _terminate(records: list[dict[str, Any]]) -> None:
        victim = _workers(ray_head)[-1]
        seen.update(pid=victim.pid, after=max(r["step"] for r in records if r["type"] == "progress"))
        victim.send_signal(signal.SIGTERM)

    thread = _when(jobs, submitted, lambda rs: any(r["type"] == "progress" for r in rs), _terminate)
    began = time.monotonic()
    failed, _ = run(job=job, cache=False, submitted=submitted, max_worker_failures=0, expect_ok=False)
    failed_s = time.monotonic() - began
    thread.join(timeout=10)
    assert "pid" in seen, "no worker was signalled"
    errors = [r for r in failed.records if r["type"] == "error"]
    assert failed.status == "FAILED" and errors and errors[0]["reason"] == "Preempted", errors
    preempted = [r for r in failed.records if r["type"] == "event" and r["message"].startswith("preempted")]
    assert len(preempted) == 1, jobs.logs(submitted[0])[-6000:]
    step = preempted[0]["step"]
    assert seen["after"] <= step < 12, (seen, step)  # not the last step's checkpoint: one for the signal
    assert [r["step"] for r in failed.records if r["type"] == "checkpoint"] == [step]
    assert preempted[0]["seconds_to_checkpoint"] < preempted[0]["grace_period_seconds"]
    resumed, metrics = run(job=job, attempt=1, cache=False)
    (start,) = [resumed.records[i] for i in _starts(resumed.records)]
    assert start["start_step"] == step and start["resumed_from"] == f"checkpoint_step_{step:08d}"
    later = [r["step"] for r in resumed.records if r["type"] == "progress"]
    assert later and min(later) == step + 1 and max(later) == 12, later
    assert metrics["steps"] == 12 and metrics["final_eval"]["eval_loss"] > 0
    print(
        f"\nDPO: SIGTERM to worker pid {seen['pid']} after step {seen['after']}: checkpoint at step "
        f"{step} {preempted[0]['seconds_to_checkpoint']} s after the signal, Ray job FAILED/Preempted "
        f"({failed_s:.0f} s); the resubmission resumed at step {step} and finished 12 "
        f"({time.monotonic() - began - failed_s:.0f} s)"
    )


def test_a_stopped_run_resumes_from_its_newest_sound_checkpoint_with_optimizer_state(
    run: Runner, workdir: Path
) -> None:
    """Attempt 0 checkpoints every 10 steps (keeping 3) and fails after step 40, with no worker
    retries: the Ray job fails. Then, in storage, step 40's state.pt is truncated (its marker no
    longer matches: skipped without loading) and step 30's is overwritten with garbage of the same
    size (loading fails on every worker: skipped). Attempt 1 is a new Ray job: it says so for each
    in an event, resumes at step 20, and its losses match an uninterrupted run step for step, which
    needs the same data position and the restored optimizer state."""
    _, straight = run("pretrain-tiny-llama")
    job = _variant("pretrain-tiny-llama", "tiny-llama-resume", checkpointing={"intervalSteps": 10, "keep": 3})
    failed, _ = run(job=job, fail_at_step=40, max_worker_failures=0, cache=False, expect_ok=False)
    assert failed.status == "FAILED"
    assert [r["step"] for r in failed.records if r["type"] == "checkpoint"] == [10, 20, 30, 40]
    (root,) = (workdir / "runs/tiny-llama-resume/checkpoints").iterdir()
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint_step_"))[-3:] == [
        f"checkpoint_step_{s:08d}" for s in (20, 30, 40)
    ]
    newest, previous = root / "checkpoint_step_00000040/state.pt", root / "checkpoint_step_00000030/state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    previous.write_bytes(b"\0" * previous.stat().st_size)
    resumed, metrics = run(job=job, attempt=1, cache=False)
    skipped = {r["step"]: r["why"] for r in resumed.records if r.get("message") == "skipped checkpoint"}
    assert "truncated" in skipped[40] and skipped.keys() == {40, 30}, skipped
    events = [r for r in resumed.records if r.get("message") == "resumed from checkpoint"]
    assert events[0]["step"] == 20 and metrics["resumed_from_step"] == 20
    assert metrics["steps"] == straight["steps"]
    assert metrics["final_loss"] == pytest.approx(straight["final_loss"], rel=2e-3)
    assert metrics["final_eval"]["eval_loss"] == pytest.approx(straight["final_eval"]["eval_loss"], rel=2e-3)
    print(f"\nskipped: {skipped}; resumed at step 20")


@pytest.mark.soak  # the SIGKILLed worker above takes the same restart path for real
def test_lost_worker_is_restarted_within_the_job(run: Runner) -> None:
    """Ray Train's FailureConfig: a worker failure inside one Ray job restarts the workers, which
    resume from the newest checkpoint; the job still succeeds."""
    job = _variant("pretrain-tiny-llama", "tiny-llama-retry")
    result, metrics = run(job=job, fail_at_step=40, max_worker_failures=2, cache=False)
    assert result.ok and metrics["resumed_from_step"] == 40
    _assert_learned(metrics)


# -- failing loudly and early --------------------------------------------------------------------


def test_missing_data_fails_before_workers_start(run: Runner) -> None:
    job = _variant(
        "pretrain-tiny-llama",
        "tiny-llama-nodata",
        data={"sources": [{"uri": "examples/data/nope.jsonl"}], "sequenceLength": 64},
    )
    result, _ = run(job=job, cache=False, expect_ok=False)
    assert result.status == "FAILED"
    errors = [r for r in result.records if r["type"] == "error"]
    assert errors and "nope.jsonl" in errors[0]["message"]
    assert errors[0]["reason"] == "DataError"  # typed: the operator fails the job at once, no retry
    assert not any(r["type"] == "event" and r["message"] == "training started" for r in result.records)


# -- preflight and storage faults ----------------------------------------------------------------


def _figure(what: str, seconds: float) -> None:
    print(f"\n{what}: {seconds:.1f} s from submission")


def _tiny(name: str, steps: int, **spec: Any) -> Any:
    training = yaml.safe_load((EXAMPLES / "pretrain-tiny-llama.yaml").read_text())["spec"]["training"]
    return _variant("pretrain-tiny-llama", name, training={**training, "maxSteps": steps}, **spec)


def _worker_group_starts(ray_head: LocalRay, result: RunResult) -> int:
    log = RayJobs(ray_head.address, token=ray_head.token).logs(result.submission_id)
    return log.count("Attempting to start training worker group")


def test_preflight_passes_before_the_first_step(run: Runner) -> None:
    result, _ = run("pretrain-tiny-llama")  # the run of the first test (cached)
    events = [r for r in result.records if r.get("type") == "event"]
    messages = [e["message"] for e in events]
    passed = events[messages.index("preflight passed")]
    assert messages.index("preflight passed") < messages.index("training started")
    assert passed["workers"] == 2 and passed["seconds"] < 1
    print(f"\npreflight on 2 workers: {passed['seconds']:.3f} s")


@pytest.mark.parametrize("where", ["checkpoint", "output"])
def test_unwritable_storage_fails_preflight_before_workers_start(
    run: Runner, tmp_path: Path, where: str
) -> None:
    """Checkpoints (or the output) on a read-only volume: the driver's input check (the one
    `forgeline run` makes before Ray starts, forgeline_operator.api.inputs) fails the job before
    the data is prepared and any worker starts, as StorageError naming the field and the fix."""
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        location = ro / where
        if where == "checkpoint":
            job = _tiny("tiny-llama-ro-ckpt", 20, checkpointing={"storage": str(location)})
        else:
            job = _tiny("tiny-llama-ro-out", 20, checkpointing={"storage": str(tmp_path / "ckpt")})
        t0 = time.monotonic()
        output = str(location) if where == "output" else None
        result, _ = run(job=job, cache=False, expect_ok=False, output=output)
        seconds = time.monotonic() - t0
    assert result.status == "FAILED"
    (error,) = [r for r in result.records if r["type"] == "error"]
    field = "spec.checkpointing.storage" if where == "checkpoint" else "spec.output.uri"
    assert error["reason"] == "StorageError", error
    assert error["message"].startswith(f"{field}: {location} cannot be made: {ro} cannot be written"), error
    assert error["message"].endswith(f" — fix: point {field} at a location the trainer can write"), error
    assert not any(r.get("message") in ("data ready", "training started") for r in result.records)
    _figure(f"{where} on a read-only volume → FAILED/StorageError", seconds)


def test_data_a_worker_cannot_read_fails_its_preflight(
    run: Runner, ray_head: LocalRay, tmp_path: Path
) -> None:
    """The driver reads the corpus; then it disappears (as a path only the head node has would be
    missing on a worker's node). Every worker's preflight fails the 'data' check before any step,
    the error names the check, the worker and the path, and Ray Train does not restart the group."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes((EXAMPLES / "data/corpus.jsonl").read_bytes())
    data = yaml.safe_load((EXAMPLES / "pretrain-tiny-llama.yaml").read_text())["spec"]["data"]
    job = _tiny("tiny-llama-worker-data", 20, data={**data, "sources": [{"uri": str(corpus)}]})
    jobs = RayJobs(ray_head.address, token=ray_head.token)
    submitted: list[str] = []
    taken: list[Path] = []

    def prepared(records: list[dict[str, Any]]) -> bool:
        return any(r.get("message") == "data ready" for r in records)

    watcher = _when(
        jobs, submitted, prepared, lambda _: taken.append(corpus.rename(corpus.with_suffix(".gone")))
    )
    t0 = time.monotonic()
    result, _ = run(job=job, cache=False, expect_ok=False, submitted=submitted)
    seconds = time.monotonic() - t0
    watcher.join(timeout=5)
    assert taken, "the corpus was never taken away"
    assert result.status == "FAILED"
    (error,) = [r for r in result.records if r["type"] == "error"]
    assert error["reason"] == "PreflightFailed", error
    assert error["message"].startswith("preflight check 'data' failed on worker "), error
    assert f"no data at {corpus}" in error["message"] and "every Ray pod" in error["message"]
    assert not any(r["type"] == "progress" or r.get("message") == "training started" for r in result.records)
    assert _worker_group_starts(ray_head, result) == 1  # not retried (max_worker_failures is 2)
    _figure("data a worker cannot read → FAILED/PreflightFailed", seconds)


def test_a_checkpoint_volume_that_fills_is_a_storage_error(
    run: Runner, ray_head: LocalRay, tmp_path: Path
) -> None:
    """Checkpoints on a 256 KiB volume: preflight passes (its probe is tiny), the first
    checkpoint (about 1 MB) does not fit — a StorageError naming the path, not retried, and never
    a success without checkpoints."""
    with tmpfs(tmp_path / "full", "size=256k") as full:
        job = _tiny(
            "tiny-llama-full-ckpt", 20, checkpointing={"storage": str(full / "ckpt"), "intervalSteps": 10}
        )
        t0 = time.monotonic()
        result, _ = run(job=job, cache=False, expect_ok=False)
        seconds = time.monotonic() - t0
    assert result.status == "FAILED"
    types = [r["type"] for r in result.records]
    assert "progress" in types and "checkpoint" not in types and "done" not in types
    (error,) = [r for r in result.records if r["type"] == "error"]
    assert error["reason"] == "StorageError", error
    assert f"{full / 'ckpt'}" in error["message"] and "(ENOSPC)" in error["message"], error
    assert "spec.checkpointing.storage" in error["message"]
    assert _worker_group_starts(ray_head, result) == 1
    _figure(f"checkpoint volume full at step 10 → FAILED/StorageError ({error['message'][:160]})", seconds)


def test_trainer_rejects_a_bad_config_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "job.json"
    bad.write_text(json.dumps({"kind": "TrainingJob", "name": "x", "spec": {}}))
    proc = subprocess.run(
        [sys.executable, "-m", "forgeline_trainer", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "invalid job config" in proc.stderr and "paths" in proc.stderr


def test_forgeline_run_cli_ctrl_c_stops_the_ray_job(tmp_path: Path) -> None:
    """The real command: embedded Ray, live output; SIGINT stops the Ray job and the head."""
    (tmp_path / "examples").symlink_to(EXAMPLES)
    doc = yaml.safe_load((EXAMPLES / "pretrain-tiny-llama.yaml").read_text())
    doc["metadata"]["name"] = "ctrl-c"
    doc["spec"]["training"]["maxSteps"] = 5000
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    exe = str(Path(sys.executable).parent / "forgeline")
    proc = subprocess.Popen(
        [exe, "run", "job.yaml"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "120"},
    )
    seen = []
    deadline = time.monotonic() + 240
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if "training started" in line or time.monotonic() > deadline:
            break
    assert any("training started" in s for s in seen), "".join(seen)
    proc.send_signal(signal.SIGINT)
    try:
        rest, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
        pytest.fail("forgeline run did not exit within 300 s of SIGINT:\n" + "".join(seen) + rest)
    output = "".join(seen) + rest
    assert proc.returncode == 130, output
    assert "stopped Ray job forgeline-ctrl-c-" in output and "(STOPPED)" in output
    assert not (tmp_path / "runs/ctrl-c/model.safetensors").exists()
