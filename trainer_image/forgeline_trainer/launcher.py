"""The Ray job's entry point: validate the job config, prepare data, run the recipe on Ray Train.

    python -m forgeline_trainer --config job.json      (or --config '{"kind": ...}')

Runs as the driver of a Ray job (submitted through the Jobs API by the operator or by
`forgeline run`). Everything that can be checked before a worker starts is checked here: the
config parses, paths exist, data is readable and not empty, the model loads. Then a TorchTrainer
(Ray Train v2) runs the recipe's `train_loop` on `workers × max(gpusPerWorker, 1)` processes:
gloo on CPU, NCCL on GPU; OMP_NUM_THREADS = the CPUs each process gets.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from forgeline_operator.api import inputs
from forgeline_operator.api.finetune_job import MERGE_METHOD, PREFERENCE_METHODS, RL_METHODS, SFT_METHODS
from forgeline_operator.api.jobconfig import (
    FineTuneJobConfig,
    TrainingJobConfig,
    dump_job_config,
    load_job_config,
)
from forgeline_operator.api.quantities import cpu_cores

from . import lineage, preflight, progress, storage
from .errors import (
    ConfigError,
    DataError,
    ModelUnavailable,
    PreflightFailed,
    StorageError,
    reason_for,
    root_cause,
    storage_error,
)
from .recipes import Prepared


def recipe_for(cfg: TrainingJobConfig | FineTuneJobConfig):  # noqa: ANN201 - a recipe module
    """The recipe module for a job: by kind, then by the API's method groups."""
    if isinstance(cfg, TrainingJobConfig):
        from .recipes import pretrain

        return pretrain
    method = cfg.spec.method
    if method in SFT_METHODS:
        from .recipes import finetune

        return finetune
    if method in PREFERENCE_METHODS:
        from .recipes import preference

        return preference
    if method in RL_METHODS:
        from .recipes import rl

        return rl
    if method == MERGE_METHOD:  # one process (the API allows one worker): a worker group of one
        from .recipes import merge

        return merge
    raise ConfigError(f"spec.method: no recipe runs {method!r}")


def scaling(cfg: TrainingJobConfig | FineTuneJobConfig) -> tuple[int, bool, dict[str, float]]:
    """(training processes, use GPUs, resources per process)."""
    res = cfg.spec.resources
    cpus = cpu_cores(res.cpu)  # ValueError naming spec.resources.cpu (the API checks it first)
    if res.gpus_per_worker:
        return res.workers * res.gpus_per_worker, True, {"CPU": max(cpus / res.gpus_per_worker, 1), "GPU": 1}
    return res.workers, False, {"CPU": max(cpus, 1)}


def _prepare(cfg: TrainingJobConfig | FineTuneJobConfig, recipe: Any) -> Prepared:
    """The recipe's driver-side preparation, between a "preparing data" and a "data ready" event."""
    progress.emit({"type": "event", "message": "preparing data", "job": cfg.name})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="forgeline-prep-") as staging:
        prepared: Prepared = recipe.prepare(cfg, Path(staging))
    progress.emit(
        {
            "type": "event",
            "message": "data ready",
            "seconds": round(time.perf_counter() - t0, 2),
            **prepared.report(),
        }
    )
    return prepared


def run(cfg: TrainingJobConfig | FineTuneJobConfig) -> dict[str, Any]:
    """Prepare on the driver, then run the recipe's train_loop on Ray Train; the result's
    checkpoint and last metrics."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    recipe = recipe_for(cfg)
    _check_inputs(cfg)
    workers, use_gpu, per_worker = scaling(cfg)
    threads = str(max(1, math.floor(per_worker["CPU"])))
    env = {
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
        # Ray Train's controller polls its workers every 2 s by default: a finished, failed or
        # preempted worker group went unnoticed for up to that long (bench/time_to_first_step.py)
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
    }
    cores = max(1, min(os.cpu_count() or 1, workers * int(threads)))
    if not use_gpu and progress.driver_can_probe_for_workers(cores):
        # MFU's denominator: one probe of the node with all its cores, not one per worker
        env[progress.CPU_PEAK_ENV] = f"{progress.cached_node_cpu_peak_per_core(cores):.6g}"
    os.environ.update(env)
    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": env}, log_to_driver=True)
    _check_storage(cfg)
    if use_gpu:
        preflight.gpu_nodes(cfg.spec.resources.gpus_per_worker)
    storage_path = storage.resolve(cfg.paths.checkpoints, cfg.paths.work_dir)
    prepared = _prepare(cfg, recipe)
    origins = lineage.driver_inputs(cfg)  # the data's digests (read above) and the models'
    ck = cfg.spec.checkpointing
    run_name = cfg.run.run_name if ck.resume == "auto" else f"{cfg.run.run_name}-{int(time.time())}"
    trainer = TorchTrainer(
        functools.partial(worker_entry, recipe.train_loop),
        train_loop_config={"config": dump_job_config(cfg), "prepared": prepared, "lineage": origins},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=ck.keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_worker_failures),
            callbacks=[preflight.stop_retrying()],  # no retries for what retrying cannot fix
            worker_runtime_env={"env_vars": env},
        ),
    )
    result = trainer.fit()
    return {
        "checkpoint": None if result.checkpoint is None else result.checkpoint.path,
        "metrics": result.metrics,
    }


def worker_entry(train_loop: Any, config: dict[str, Any]) -> Any:
    """Each Ray Train worker's entry: the driver's lineage findings for the output's record, then
    the recipe's train_loop (a failing attempt still says where its time went: ledger_on_failure)."""
    lineage.INPUTS.clear()
    lineage.INPUTS.update(config.get("lineage") or {})
    return progress.ledger_on_failure(train_loop, config)


_INPUT_ERRORS = {"DataError": DataError, "ModelUnavailable": ModelUnavailable, "StorageError": StorageError}


def _check_inputs(cfg: TrainingJobConfig | FineTuneJobConfig) -> None:
    """The checks `forgeline run` makes before it starts Ray (forgeline_operator.api.inputs),
    made again where the job reads its inputs (on a cluster: the head pod, which mounts the
    workers' volumes), before Ray Train or the data: the first problem as its typed error, naming
    the field and the fix, in seconds."""
    problems = inputs.check(cfg)
    if problems:
        first = problems[0]
        raise _INPUT_ERRORS[first.reason](f"{first.field}: {first.message} — fix: {first.fix}")


def _check_storage(cfg: TrainingJobConfig | FineTuneJobConfig) -> None:
    """The driver's preflight of the checkpoint and output locations (creating them), before the
    data is prepared and workers start: Ray Train writes checkpoint state from the driver, and the
    Ray pods mount the same volumes, so an unwritable location fails here in seconds, named."""
    for check, uri in (("checkpoint storage", cfg.paths.checkpoints), ("output storage", cfg.paths.output)):
        try:
            preflight.storage_probe(storage.resolve(uri, cfg.paths.work_dir), None)
        except OSError as exc:
            raise PreflightFailed(check, None, f"{exc} — fix: {preflight.FIXES[check]}") from exc


def _report_error(exc: BaseException, cfg: TrainingJobConfig | FineTuneJobConfig | None = None) -> None:
    """The `error` progress record: the message and, where the trainer can tell, the typed
    reason (the operator classifies the log for the rest)."""
    exc = root_cause(exc)  # ray.train.ControllerError: a worker's error ended the run (stop_retrying)
    inner = getattr(exc, "worker_failures", None)  # ray.train.WorkerGroupError: the workers' own
    first = next(iter(inner.values()), exc) if isinstance(inner, dict) and inner else exc
    if cfg is not None and not isinstance(first, StorageError) and reason_for(first) == "StorageError":
        # a full or read-only volume under Ray Train's own writes (checkpoint upload, its run state)
        where = storage.resolve(cfg.paths.checkpoints, cfg.paths.work_dir)
        if cfg.paths.checkpoints.startswith("pvc://"):  # the URI the user wrote, and its mount
            where = f"{cfg.paths.checkpoints} ({where} in the Ray pods)"
        first = storage_error(first, where, "writing checkpoints", "spec.checkpointing.storage") or first
    # our own messages name the field or the check
    plain = isinstance(first, (ValueError, FileNotFoundError, PreflightFailed, StorageError))
    message = str(first) if plain else f"{type(first).__name__}: {first}"
    if len(message) > 1000:  # Ray's OutOfMemoryError carries pages of memory tables: whole lines
        message = "\n".join(_lines_within(message.splitlines(), 1000)) or message[:1000]
    record = {"type": "error", "message": message, "reason": reason_for(exc)}
    progress.emit({k: v for k, v in record.items() if v is not None})


def _lines_within(lines: list[str], limit: int) -> list[str]:
    """The first whole lines whose total length stays within `limit`."""
    out: list[str] = []
    for line in lines:
        if sum(len(x) + 1 for x in out) + len(line) > limit:
            break
        out.append(line)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m forgeline_trainer", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config",
        required=True,
        help="job config: a JSON file, JSON text, or env:VAR (read from that variable)",
    )
    args = parser.parse_args(argv)
    source = args.config
    if source.startswith("env:"):
        source = os.environ.get(source[4:], "")
        if not source:
            print(f"forgeline-trainer: {args.config[4:]} is empty or unset", file=sys.stderr)
            return 2
    try:
        cfg = load_job_config(source)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a config error, reported plainly
        print(f"forgeline-trainer: invalid job config: {exc}", file=sys.stderr)
        return 2
    try:
        result = run(cfg)
    except (ValueError, FileNotFoundError) as exc:  # a clear message is all a user needs
        _report_error(exc, cfg)
        print(f"forgeline-trainer: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        _report_error(exc, cfg)
        raise  # the traceback goes to the Ray job's log
    progress.emit({"type": "finished", "output": cfg.paths.output, "checkpoint": result["checkpoint"]})
    return 0
