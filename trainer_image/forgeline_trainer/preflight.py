"""Preflight: check in seconds, on every Ray Train worker before its first step, what would
otherwise fail an hour in — and fail at once with `PreflightFailed` naming the check and worker.

    run(cfg, rt)          every worker, at the end of `Worker.start` (before any model or data)
    storage_probe(...)    also on the driver (launcher), for the checkpoint and output locations,
                          before the data is prepared and the workers start: where the driver can
                          check, it fails first, in seconds (the Ray pods mount the same volumes)
    gpu_nodes(...)        on the driver, before the worker group starts, for a job with GPUs: one
                          small task on every Ray node that offers GPUs asks torch whether they are
                          usable there. Ray Train's own set-up (an NCCL process group) fails first
                          otherwise, deep in a traceback that names no pod and reads as user code

The checks, in order (each worker runs the local ones, then all meet in one bounded all-reduce
that also carries which worker failed which check, so every worker stops with the same error):

    gpu                   spec.resources.gpusPerWorker > 0: CUDA available, this worker's device
                          among the visible ones, a small matmul on it agrees with the CPU
    checkpoint storage    write, read back and delete a probe file in the checkpoint location
    output storage        the same in the output location (local, pvc:// or s3:// through fsspec)
    data                  open every data source the job names and read its first bytes (the
                          driver read them already; a worker on another node may not see a path)
    collective            an all-reduce over all workers within FORGELINE_PREFLIGHT_TIMEOUT_S
                          (default 120 s), and its sum is right

Rank 0 then emits the event `preflight passed` with the seconds it took. A failure is not retried
inside the Ray job: `stop_retrying()` is a Ray Train callback that ends the run at the first
worker exception whose reason retrying cannot fix (errors.NOT_RETRIED).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import progress, storage
from .errors import PreflightFailed, not_retried

if TYPE_CHECKING:
    from forgeline_operator.api.jobconfig import FineTuneJobConfig, TrainingJobConfig

    from .runtime_info import RuntimeInfo

CHECKS = ("gpu", "checkpoint storage", "output storage", "data", "collective")
TIMEOUT_ENV = "FORGELINE_PREFLIGHT_TIMEOUT_S"
FIXES = {
    "checkpoint storage": "make it writable from every Ray pod (a ReadWriteMany PVC, fsGroup, bucket "
    "permissions) or point spec.checkpointing.storage elsewhere",
    "output storage": "make it writable from every Ray pod or point spec.output.uri elsewhere",
    "data": "put the data where every Ray pod can read it (object storage, or a PVC mounted on every "
    "pod), not a path only the head node has",
}
_HEAD_BYTES = 64


def run(cfg: TrainingJobConfig | FineTuneJobConfig, rt: RuntimeInfo) -> float:
    """Every check on this worker; the seconds they took. Raises PreflightFailed."""
    t0 = time.perf_counter()
    work = cfg.paths.work_dir
    local: list[tuple[str, Callable[[], None]]] = [
        ("gpu", lambda: check_gpu(cfg.spec.resources.gpus_per_worker)),
        ("checkpoint storage", lambda: storage_probe(storage.resolve(cfg.paths.checkpoints, work), rt.rank)),
        ("output storage", lambda: storage_probe(storage.resolve(cfg.paths.output, work), rt.rank)),
        ("data", lambda: check_data(data_sources(cfg), work)),
    ]
    failure: PreflightFailed | None = None
    for check, fn in local:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - any failure of a check is that check's failure
            fix = f" — fix: {FIXES[check]}" if check in FIXES else ""
            failure = PreflightFailed(check, rt.rank, _detail(exc) + fix)
            break
    try:
        failed = check_collective(rt, None if failure is None else CHECKS.index(failure.check))
    except PreflightFailed:
        if failure is not None:  # this worker's own finding first, even when the others hung
            raise failure from None
        raise
    if failure is not None:
        raise failure
    if failed:  # another worker failed a local check: stop with its check and rank
        rank, index = failed[0]
        raise PreflightFailed(CHECKS[index], rank, f"reported by worker {rank} (its log has the details)")
    seconds = time.perf_counter() - t0
    if rt.rank == 0:
        record = {"type": "event", "message": "preflight passed", "seconds": round(seconds, 3)}
        progress.emit({**record, "workers": rt.world})
    return seconds


def _detail(exc: BaseException) -> str:
    if isinstance(exc, PreflightFailed):
        return exc.detail
    text = str(exc) or type(exc).__name__
    plain = isinstance(exc, (OSError, ValueError)) or type(exc) is RuntimeError  # our own words
    return text if plain else f"{type(exc).__name__}: {text}"


# -- the checks --------------------------------------------------------------------------------


def check_gpu(gpus_per_worker: int) -> None:
    """Nothing without GPUs; else CUDA available, this worker's device visible, a matmul right."""
    if not gpus_per_worker:
        return
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            f"the job asks for {gpus_per_worker} GPU(s) per worker but torch sees no usable CUDA device "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda}); check the node's driver and the device plugin"
        )
    count = torch.cuda.device_count()
    device = _train_device()
    if device.type != "cuda" or (device.index or 0) >= count:
        raise RuntimeError(f"this worker's device {device} is not among the {count} visible CUDA devices")
    a = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64).div_(4096)
    expected = a @ a.T
    got = (a.to(device) @ a.to(device).T).cpu()
    if not torch.allclose(got, expected, rtol=1e-2, atol=1e-2):
        name = torch.cuda.get_device_name(device)
        raise RuntimeError(f"a 64×64 matmul on {device} ({name}) gives wrong results")


def gpu_report() -> dict[str, Any]:
    """What this process (a task holding a node's GPUs) sees: which pod and Kubernetes node it is
    on, the GPUs Ray gave it, and whether torch can use them."""
    import glob
    import socket

    import ray
    import torch

    ids = ray.get_gpu_ids()
    usable = torch.cuda.is_available()
    return {
        "pod": os.environ.get("FORGELINE_POD_NAME") or socket.gethostname(),
        "node": os.environ.get("FORGELINE_NODE_NAME"),
        "ip": ray.util.get_node_ip_address(),
        "ray_gpus": len(ids),
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "usable": usable,
        "count": torch.cuda.device_count() if usable else 0,
        "device_files": sorted(glob.glob("/dev/nvidia[0-9]*")),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def gpu_failure(report: dict[str, Any]) -> PreflightFailed | None:
    """None when the node's GPUs are usable; else the failure naming the pod, its node and the
    GPUs Kubernetes and Ray gave it that torch cannot use."""
    if report["usable"] and report["count"] >= report["ray_gpus"]:
        return None
    node = f" on node {report['node']}" if report.get("node") else ""
    where = f"worker pod {report['pod']}{node} ({report['ip']})"
    files = ", ".join(report["device_files"]) or "no /dev/nvidia* device files"
    if report["usable"]:
        seen = f"torch sees only {report['count']} CUDA device(s)"
    else:
        seen = "torch sees no usable CUDA device"
    detail = (
        f"Ray gave this pod {report['ray_gpus']} GPU(s) (its nvidia.com/gpu request) but {seen} "
        f"(CUDA_VISIBLE_DEVICES={report['visible']!r}, {files}, torch {report['torch']} built for CUDA "
        f"{report['cuda']}) — fix: the node's NVIDIA driver or device plugin is missing or broken "
        "(kubectl describe node; nvidia-smi on it), or choose another spec.resources.nodePool"
    )
    return PreflightFailed("gpu", None, detail, where=where)


def gpu_nodes(gpus_per_worker: int, timeout: float | None = None) -> int:
    """Driver side, before any training process starts: run gpu_report on every live Ray node that
    offers GPUs, holding all of them; raise the first failure. The number of nodes checked."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    timeout = timeout if timeout is not None else float(os.environ.get(TIMEOUT_ENV, "120"))
    nodes = [n for n in ray.nodes() if n.get("Alive") and (n.get("Resources") or {}).get("GPU", 0) > 0]
    if not nodes:
        return 0  # none has joined yet: Ray Train waits for them, the operator's watchdog bounds it
    task = ray.remote(num_cpus=0)(gpu_report)
    refs = [
        task.options(
            num_gpus=n["Resources"]["GPU"],
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
        ).remote()
        for n in nodes
    ]
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    for ref in pending:
        ray.cancel(ref, force=True)
    for ref in ready:
        failure = gpu_failure(ray.get(ref))
        if failure is not None:
            raise failure
    if pending:
        raise PreflightFailed(
            "gpu",
            None,
            f"{len(pending)} of {len(refs)} GPU nodes did not answer a GPU check within {timeout:.0f} s",
        )
    return len(nodes)


def _train_device() -> Any:
    import ray.train.torch

    return ray.train.torch.get_device()


def storage_probe(location: str, rank: int | None) -> None:
    """Write, read back and delete a small file in `location` (the directory is created if missing)."""
    name = f".forgeline-preflight-{'driver' if rank is None else rank}-{uuid.uuid4().hex[:8]}"
    payload = f"forgeline preflight {name}".encode()
    if storage.is_remote(location):
        import fsspec

        fs, root = fsspec.core.url_to_fs(location)
        path = f"{root.rstrip('/')}/{name}"
        fs.pipe_file(path, payload)
        try:
            back = fs.cat_file(path)
        finally:
            fs.rm_file(path)
    else:
        from pathlib import Path

        base = Path(location)
        # The directory stays: workers on one node probe it at the same time, and training
        # creates it anyway (Ray Train's storage, publish).
        base.mkdir(parents=True, exist_ok=True)
        probe = base / name
        try:
            probe.write_bytes(payload)
            back = probe.read_bytes()
        finally:
            probe.unlink(missing_ok=True)
    if back != payload:
        raise OSError(f"{location}: a probe file read back differs from what was written")


def data_sources(cfg: TrainingJobConfig | FineTuneJobConfig) -> list[Any]:
    """Every data source the job names: spec.data (TrainingJob) or spec.dataset (FineTuneJob),
    and spec.evaluation."""
    sources: list[Any] = []
    for section in ("data", "dataset", "evaluation"):
        sources.extend(getattr(getattr(cfg.spec, section, None), "sources", None) or [])
    return sources


def check_data(sources: list[Any], work_dir: str | None) -> None:
    """Each source opens and its first file's first bytes read (a saved dataset: its directory lists)."""
    for src in sources:
        location = storage.resolve(src.uri, work_dir)
        try:
            if getattr(src, "format", None) == "saved-dataset":
                import fsspec

                fs, root = fsspec.core.url_to_fs(location)
                if not fs.ls(root):
                    raise FileNotFoundError(f"{location} is empty")
                continue
            first = storage.expand(location)[0]
            with storage.open_file(first) as f:
                f.read(_HEAD_BYTES)
        except Exception as exc:
            detail = _detail(exc)
            raise RuntimeError(f"cannot read data source {src.uri} ({location}) here: {detail}") from exc


def check_collective(rt: RuntimeInfo, own_failure: int | None) -> list[tuple[int, int]]:
    """One all-reduce over every worker, bounded by FORGELINE_PREFLIGHT_TIMEOUT_S; its sum must be
    right. It also carries each worker's failed local check (or none): the (rank, check index)
    pairs of the workers that failed one, by rank."""
    import torch

    dist = torch.distributed
    if not dist.is_initialized():
        if rt.world > 1:
            raise PreflightFailed("collective", rt.rank, "torch.distributed is not initialised")
        return []
    timeout = float(os.environ.get(TIMEOUT_ENV, "120"))
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    world = dist.get_world_size()
    # [1, rank + 1, failed check index + 1 at this rank's slot]
    t = torch.zeros(2 + world, dtype=torch.float64, device=device)
    t[0], t[1] = 1.0, rt.rank + 1.0
    if own_failure is not None:
        t[2 + rt.rank] = own_failure + 1.0
    from datetime import timedelta

    start = time.perf_counter()
    try:
        work = dist.all_reduce(t, async_op=True)
        work.wait(timeout=timedelta(seconds=timeout))
        got = t.cpu().tolist()
    except Exception as exc:  # noqa: BLE001 - a timeout or a broken process group: both this check
        raise PreflightFailed(
            "collective",
            rt.rank,
            f"an all-reduce over {world} workers ({dist.get_backend()}) did not complete within "
            f"{timeout:g} s ({type(exc).__name__}: {str(exc)[:300]}); check the network between the "
            "nodes (NCCL_DEBUG=INFO) and that every worker started",
        ) from None
    if got[0] != world or got[1] != world * (world + 1) / 2:
        raise PreflightFailed(
            "collective",
            rt.rank,
            f"an all-reduce over {world} workers gave {got[:2]}, "
            f"expected [{world}, {world * (world + 1) / 2}] "
            f"(after {time.perf_counter() - start:.2f} s)",
        )
    return [(r, int(code) - 1) for r, code in enumerate(got[2:]) if code]


# -- in the Ray job ----------------------------------------------------------------------------


def stop_retrying() -> Any:
    """A Ray Train callback (it runs in the controller) that ends the run at the first worker
    exception retrying cannot fix — a preflight or storage failure, bad data or config, a missing
    model — instead of restarting the worker group `FailureConfig.max_failures` times. Ray Train
    then raises a ControllerError around that exception; `errors.reason_for` looks inside."""
    import ray.train

    class StopRetrying(ray.train.UserCallback):
        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            final = not_retried(worker_exceptions)
            if final is not None:
                raise final

    return StopRetrying()
