"""Failure classification (forgeline_operator.controller.failures): real messages from torch, NCCL, Ray,
transformers and the trainer, each named with its typed reason, its fix and whether to retry."""

from __future__ import annotations

import pytest

from forgeline_operator.controller.failures import FAILURE_REASONS, classify, redact

HF_OFFLINE = (
    "OSError: We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find "
    "them in the cached files. Check your internet connection or see how to run the library in "
    "offline mode at 'https://huggingface.co/docs/transformers/installation#offline-mode'."
)
TRACEBACK = """Traceback (most recent call last):
  File "/app/forgeline_trainer/recipes/pretrain.py", line 210, in train_loop
    loss = net(**batch).loss
  File "/app/torch/nn/modules/module.py", line 1751, in _wrapped_call_impl
ZeroDivisionError: division by zero"""


@pytest.mark.parametrize(
    ("log", "reason", "retryable"),
    [
        (
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
            "capacity of 79.11 GiB of which 1.2 GiB is free.",
            "OOMKilled",
            False,
        ),
        ("Worker exited with code 137 (oom-kill)", "OOMKilled", False),
        (
            "[rank3]:[E ProcessGroupNCCL.cpp:607] [Rank 3] Watchdog caught collective operation timeout: "
            "WorkNCCL(SeqNum=812, OpType=ALLREDUCE, Timeout(ms)=600000) ran for 600052 milliseconds",
            "NCCLTimeout",
            True,
        ),
        (
            "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.",
            "WorkerLost",
            True,
        ),
        ("ray.exceptions.NodeDiedError: node 10.0.3.4 has died", "NodeLost", True),
        (  # a worker pod's raylet SIGKILLed on the real cluster (tests/test_kube_faults.py): was OOMKilled
            "RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
            "[10.160.0.13]:34986: Connection reset by peer.\n(raylet) Raylet is terminated. Termination is "
            "unexpected. Possible reasons include: (1) SIGKILL by the user or system OOM killer, (2) Invalid "
            "memory access from Raylet causing SIGSEGV or SIGBUS, (3) Other termination signals.",
            "NodeLost",
            True,
        ),
        ("received signal 15 (SIGTERM): the node is draining", "Preempted", True),
        ("Spot instance interruption notice: instance is being terminated", "Preempted", True),
        (HF_OFFLINE, "ModelUnavailable", False),
        (
            "forgeline-trainer: spec.data: every document was filtered out ({'short': 40}); "
            "loosen spec.data.filters",
            "DataError",
            False,
        ),
        (
            "forgeline-trainer: invalid job config: 1 validation error for TrainingJobConfig",
            "ConfigError",
            False,
        ),
        (
            "RuntimeError: Unable to set up cluster storage with the following settings:\n"
            "StorageContext<...>\nCheck that all nodes in the cluster have read/write access",
            "StorageError",
            False,
        ),
        (TRACEBACK, "UserCodeError", True),
        ("", "Unknown", True),
    ],
)
def test_real_messages_get_their_reason(log: str, reason: str, retryable: bool) -> None:
    failure = classify(None, "Job entrypoint command failed with exit code 1", log)
    assert failure.reason == reason, failure
    assert failure.retryable is retryable
    assert failure.fix
    assert failure.counts_against_backoff is (reason != "Preempted")


def test_the_trainers_own_reason_wins() -> None:
    failure = classify(
        {"type": "error", "reason": "DataError", "message": "no rows in x.jsonl"}, "", TRACEBACK
    )
    assert failure.reason == "DataError" and failure.message == "no rows in x.jsonl" and not failure.retryable


def test_decisive_lines_are_few_short_and_redacted() -> None:
    log = "\n".join(
        [f"step {i}" for i in range(100)]
        + [
            "connecting to s3://AKIAABCDEFGHIJKLMNOP@bucket with token=hf_abcdefghijklmnopqrstuvwxyz0123",
            "Authorization: Bearer sk-live-1234567890",
            "torch.OutOfMemoryError: CUDA out of memory. " + "x" * 1000,
        ]
    )
    failure = classify(None, "", log)
    assert failure.reason == "OOMKilled"
    assert 1 <= len(failure.decisive_lines) <= 5
    assert all(len(line) <= 300 for line in failure.decisive_lines)
    assert failure.message.startswith("torch.OutOfMemoryError")
    text = redact(log)
    for secret in ("AKIAABCDEFGHIJKLMNOP", "hf_abcdefghijklmnopqrstuvwxyz0123", "sk-live-1234567890"):
        assert secret not in text


def test_a_traceback_names_its_exception() -> None:
    failure = classify(None, "", TRACEBACK)
    assert failure.message == "ZeroDivisionError: division by zero"
    assert failure.decisive_lines[-1] == "ZeroDivisionError: division by zero"


@pytest.mark.parametrize("reason", FAILURE_REASONS)
def test_every_reason_has_a_fix_and_a_retry_rule(reason: str) -> None:
    failure = classify({"type": "error", "reason": reason, "message": "x"}, "", "")
    assert failure.reason == reason and failure.fix and failure.message == "x"
    assert failure.retryable is (
        reason
        not in (
            "OOMKilled",
            "DataError",
            "ModelUnavailable",
            "ConfigError",
            "PreflightFailed",
            "StorageError",
        )
    )


def test_a_ray_train_worker_error_names_the_workers_exception() -> None:
    log = """Traceback (most recent call last):
  File "/venv/ray/train/v2/_internal/execution/controller/controller.py", line 501, in run
ray.train.v2.api.exceptions.WorkerGroupError: Training failed due to worker errors:
[Rank 0 worker]: Traceback (most recent call last):
  File "/app/forgeline_trainer/runtime.py", line 44, in fault_injection
    raise InjectedFailure(f"injected failure at step {step}")
forgeline_trainer.runtime.InjectedFailure: injected failure at step 20"""
    failure = classify(None, "Job entrypoint command failed with exit code 1", log)
    assert failure.reason == "UserCodeError" and failure.retryable
    assert failure.message == "forgeline_trainer.runtime.InjectedFailure: injected failure at step 20"


def test_ray_noise_about_sigterm_is_no_preemption() -> None:
    log = (
        "SIGTERM handler is not set because current thread is not the main thread.\n"
        "(RayTrainWorker pid=81) SIGTERM received, shutting down worker\n" + TRACEBACK
    )
    assert classify(None, "", log).reason == "UserCodeError"


def test_a_traceback_outranks_actors_dying_because_of_it() -> None:
    died = "(TrainController pid=9) ray.exceptions.ActorDiedError: The actor died because of an error"
    assert classify(None, "", TRACEBACK + "\n" + died).reason == "UserCodeError"
    lost = "ray.train.v2.api.exceptions.WorkerGroupError: Training failed due to worker errors:\n" + died
    assert classify(None, "", "Traceback (most recent call last):\n" + lost).reason == "WorkerLost"
    noise = "(TrainController pid=9) worker group shutting down: the actor died as requested\n" + TRACEBACK
    assert classify(None, "", noise).reason == "UserCodeError"


def test_a_real_ray_train_failure_log() -> None:
    """Recorded from Ray 2.5x: colours, worker prefixes, deduplication notes, Ray Train's
    PreemptionWatcher actor (no preemption) and the worker's exception."""
    blue, plain, green = "\x1b[36m", "\x1b[0m", "\x1b[32m"
    controller = f"{blue}(TrainController pid=12386){plain} "
    worker = f"{blue}(RayTrainWorker pid=12496){plain} "
    error = "forgeline_trainer.runtime.InjectedFailure: injected failure after step 20"
    log = "\n".join(
        [
            controller + "[2026-11-24 14:33:40,526 E 12386 12418] core_worker.cc:2465: Actor with class "
            "name: 'PreemptionWatcher' and ID: '786c' has constructor arguments in the object store",
            worker + "Traceback (most recent call last):",
            worker + error,
            "ray.train.WorkerGroupError: Training failed due to worker errors:",
            controller + error + f"{green} [repeated 2x across cluster] (Ray deduplicates logs){plain}",
        ]
    )
    failure = classify(None, "Job entrypoint command failed with exit code 1", log)
    assert failure.reason == "UserCodeError"
    assert failure.message == "forgeline_trainer.runtime.InjectedFailure: injected failure after step 20"


def test_the_trainers_own_fix_is_the_fix_and_the_message_is_whole() -> None:
    """On the real cluster's GPU node the message was cut at 300 characters in the middle of its
    detail ("built for CUDA 13."), and the fix shown was the generic one for PreflightFailed."""
    detail = (
        "preflight check 'gpu' failed on worker pod gpu-tj-train-worker-2xqc7 on node forgeline-gpu "
        "(10.160.1.2): Ray gave this pod 1 GPU(s) (its nvidia.com/gpu request) but torch sees no usable "
        "CUDA device (CUDA_VISIBLE_DEVICES='0', no /dev/nvidia* device files, torch 2.13.0+cu130 built "
        "for CUDA 13.0) — fix: the node's NVIDIA driver or device plugin is missing or broken "
        "(kubectl describe node; nvidia-smi on it), or choose another spec.resources.nodePool"
    )
    failure = classify({"reason": "PreflightFailed", "message": detail}, "", "")
    assert failure.reason == "PreflightFailed" and not failure.retryable
    assert failure.message.endswith("built for CUDA 13.0)") and "— fix" not in failure.message
    assert failure.fix.startswith("the node's NVIDIA driver") and failure.fix.endswith(
        "spec.resources.nodePool"
    )
    generic = classify({"reason": "PreflightFailed", "message": "preflight check 'gpu' failed"}, "", "")
    assert generic.fix.startswith("fix what the named check")


RAY_OOM = (
    "OutOfMemoryError: Task was killed due to the node running low on memory.\n"
    "Memory on the node (IP: 10.160.0.10, ID: 3104c229) where the lease was running was 1.49GB / 1.50GB "
    "(0.991674), which exceeds the memory usage threshold of 0.95. Ray killed this worker (ID: f298c46d) "
    "because it was the most recently scheduled task.\n"
    "Top 10 memory users:\nPID\tMEM(GB)\tCOMMAND\n212\t1.23\tray::RayTrainWorker\n"
    + "\n".join(f"- objects {k}: 0" for k in ("created", "restored", "received", "errored") * 30)
)


def test_rays_own_oom_kill_in_a_pod_says_the_limit_and_the_field_to_raise() -> None:
    """A worker over its container's memory limit on the real cluster (tests/test_kube_faults.py):
    Ray's memory monitor kills it at 95% of the limit and raises OutOfMemoryError with pages of
    memory tables. Status says the first line (used / limit), not the cut end of the tables, and
    the fix names spec.resources.memory with the job's value."""
    from forgeline_operator.controller.failures import in_pods

    record = {"type": "error", "message": RAY_OOM[:1000]}  # as a trainer before this fix cut it
    failure = classify(record, "Job entrypoint command failed with exit code 1", "")
    assert failure.reason == "OOMKilled" and not failure.retryable
    assert failure.message.startswith("OutOfMemoryError: Task was killed due to the node running low")
    failure = in_pods(failure, "1536Mi")
    assert "give the workers more memory than spec.resources.memory=1536Mi" in failure.fix
    other = classify(None, "", "ValueError: x")
    assert in_pods(other, "1536Mi") == other


def test_the_trainer_keeps_a_long_error_message_to_whole_lines() -> None:
    from forgeline_trainer.launcher import _lines_within

    kept = _lines_within(RAY_OOM.splitlines(), 1000)
    assert kept[0].startswith("OutOfMemoryError") and len("\n".join(kept)) <= 1000
    assert RAY_OOM.startswith("\n".join(kept))
