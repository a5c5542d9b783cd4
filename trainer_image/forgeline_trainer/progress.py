"""Progress records, Prometheus metrics and MFU.

Rank 0 prints one line `FORGELINE_PROGRESS {json}` every few seconds (and at every eval and the
end). Ray forwards worker output to the Ray job's log, so the operator and `forgeline run` read
progress from the Jobs API without shared storage. The same figures go to Ray's metrics agent
(`ray.util.metrics` gauges, `forgeline_trainer_*`), which every Ray pod exposes for Prometheus.

MFU = achieved model FLOPs / peak FLOPs. Model FLOPs per token = 6·N (N = parameters a token
passes through; for MoE the active ones) + 12·L·d·S (attention scores and values, PaLM's
appendix B); with a frozen base (PEFT) 4·N + 2·T instead of 6·N, T the trainable weights. The
peak is the device's datasheet dense bf16 figure on known GPUs; on CPU it is measured once per
run with a matmul probe — so a CPU MFU says how close training gets to what this CPU's matmul
reaches, not to a datasheet.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgeline_operator.api.jobconfig import PROGRESS_PREFIX

from . import evaluation

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment.
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A6000": 155e12,
    "V100": 125e12,
    "T4": 65e12,
}


def model_flops_per_token(n_params: int, n_layers: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6·N + 12·L·d·S (PaLM, appendix B)."""
    return 6.0 * n_params + 12.0 * n_layers * d_model * seq_len


def peft_flops_per_token(n_params: int, n_trainable: int, n_layers: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token when only some weights train (PEFT, frozen base): forward 2·N +
    backward through the activations 2·N + weight gradients 2·T for the T trainable weights only,
    + 12·L·d·S for attention."""
    return 4.0 * n_params + 2.0 * n_trainable + 12.0 * n_layers * d_model * seq_len


def measure_cpu_peak(threads: int | None = None, size: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s this process reaches on an fp32 matmul (the CPU 'peak' MFU is measured against)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start)


def device_peak_flops() -> tuple[float, str]:
    """(peak FLOP/s of one training process's device, how it was obtained)."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for frag, peak in GPU_PEAK_BF16.items():
            if frag in name:
                return peak, f"datasheet bf16 peak of {name}"
        return 0.0, f"unknown GPU {name}: MFU not reported"
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    per_thread = os.environ.get(CPU_PEAK_ENV)
    if per_thread:  # measured once by the driver with all of the node's cores (launcher)
        return float(per_thread) * threads, (
            f"fp32 matmul peak of this CPU, measured once before training on all its cores "
            f"({float(per_thread) / 1e9:.1f} GFLOP/s per core × {threads})"
        )
    peak = measure_cpu_peak(threads)
    return peak, "measured fp32 matmul peak of this CPU (probe in this worker)"


CPU_PEAK_ENV = "FORGELINE_CPU_PEAK_PER_CORE"
"""FLOP/s of one CPU core on an fp32 matmul, measured by the driver with every core of the node
busy (so workers never probe against each other, and MFU is against the node's real peak)."""


def cpu_quota_cores(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPUs this process's cgroup may use (its CFS quota: a pod's CPU limit), None when it has
    no limit. cgroup v2 (`cpu.max`) or v1 (`cpu/cpu.cfs_quota_us` / `cpu.cfs_period_us`)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for controller in ("cpu", "cpu,cpuacct"):
        try:
            quota_us = int((root / controller / "cpu.cfs_quota_us").read_text())
            period_us = int((root / controller / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def driver_can_probe_for_workers(cores: int) -> bool:
    """Whether the driver's one probe of `cores` threads can stand for its workers: not when the
    driver's own CPU limit is below that (KubeRay's head pod, 500m, while the workers run in pods
    of their own), where the probe would run throttled and every worker's MFU come out inflated,
    past 1. Then each worker probes its own CPUs (device_peak_flops), inside its pod's limit."""
    quota = cpu_quota_cores()
    return quota is None or quota >= cores


def node_cpu_peak_per_core(cores: int) -> float:
    """The node's fp32 matmul FLOP/s with `cores` threads, per core: the driver measures it once,
    before the workers start."""
    return measure_cpu_peak(cores) / cores


CPU_PEAK_CACHE_ENV = "FORGELINE_CPU_PEAK_CACHE"
"""Where the node's measured peak is kept between jobs (a JSON file; empty = never cache)."""
CPU_PEAK_CACHE_TTL_S = 24 * 3600


def cached_node_cpu_peak_per_core(cores: int) -> float:
    """`node_cpu_peak_per_core`, measured once per node and kept for a day in a small JSON file
    ($FORGELINE_CACHE/cpu-peak.json, ~/.cache/forgeline by default), keyed by CPU model, core
    counts and torch version: the probe costs every CPU job about 0.6 s before its first step, and
    one measurement makes the MFU of jobs on the same node comparable. Falls back to measuring
    when the file can't be used."""
    import torch

    where = os.environ.get(CPU_PEAK_CACHE_ENV)
    if where is None:
        try:
            root = os.environ.get("FORGELINE_CACHE") or str(Path.home() / ".cache/forgeline")
            where = str(Path(root) / "cpu-peak.json")
        except RuntimeError:  # no home directory (an odd container user): measure every time
            where = ""
    if not where:
        return node_cpu_peak_per_core(cores)
    path = Path(where)
    key = f"{_cpu_model()}|{os.cpu_count()} cpus|{cores} threads|torch {torch.__version__}"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    entry = known.get(key)
    try:
        if time.time() - float(entry["measured_at"]) < CPU_PEAK_CACHE_TTL_S:
            return float(entry["per_core"])
    except (TypeError, KeyError, ValueError):  # no entry, or one this code didn't write: measure
        pass
    per_core = node_cpu_peak_per_core(cores)
    known[key] = {"per_core": per_core, "measured_at": time.time()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(path)  # atomic: two drivers starting at once never read half a file
    except OSError:
        tmp.unlink(missing_ok=True)
    return per_core


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def emit(record: dict[str, Any]) -> None:
    """Print one progress record line (flushed: the operator reads it live), stamped with the
    wall-clock `time` it was written (the operator's time-to-first-step uses it)."""
    stamped = {**record, "time": round(time.time(), 3)} if "time" not in record else record
    sys.stdout.write(PROGRESS_PREFIX + json.dumps(stamped, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class _Gauges:
    """Ray metrics gauges (exported by every Ray node's metrics agent for Prometheus)."""

    NAMES = {
        "loss": "Latest training loss",
        "learning_rate": "Current learning rate",
        "tokens_per_second": "Training tokens per second over all workers",
        "mfu": "Model FLOPs utilisation (0-1)",
        "step": "Optimizer steps done",
        "total_steps": "Optimizer steps planned",
        "eval_loss": "Latest evaluation loss",
        "grad_norm": "Global gradient norm before clipping",
    }

    def __init__(self, tags: dict[str, str]) -> None:
        self.tags = tags
        self.gauges: dict[str, Any] = {}
        try:
            from ray.util.metrics import Gauge

            for key, desc in self.NAMES.items():
                self.gauges[key] = Gauge(f"forgeline_trainer_{key}", description=desc, tag_keys=tuple(tags))
        except Exception:  # noqa: BLE001 - metrics are best effort outside a Ray cluster
            self.gauges = {}

    def set(self, values: dict[str, Any]) -> None:
        for key, gauge in self.gauges.items():
            value = values.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                gauge.set(float(value), tags=self.tags)


@dataclass
class Reporter:
    """Accumulates step timings on rank 0 and emits progress records at an interval."""

    job: str
    namespace: str
    kind: str
    total_steps: int
    tokens_per_step: int
    flops_per_token: float
    peak_flops_total: float
    interval: float = 5.0
    is_chief: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    peak_per_worker: float = 0.0
    """Peak FLOP/s of one worker's device (peak_flops_total = this × workers)."""
    peak_source: str = ""
    """How the peak was obtained (datasheet or CPU probe); metrics.json repeats it."""
    tracker: Any = None
    """The job's MLflow run (rank 0, when the config names a tracking server): tracking.Tracker."""

    @classmethod
    def for_run(
        cls,
        cfg: Any,
        rt: Any,
        *,
        total_steps: int,
        tokens_per_step: int,
        flops_per_token: float,
        extra: dict[str, Any] | None = None,
    ) -> Reporter:
        """The reporter of one worker of a job: measures the device's peak (for MFU) first."""
        peak, peak_source = device_peak_flops()
        reporter = cls(
            job=cfg.name,
            namespace=cfg.namespace,
            kind=cfg.kind,
            total_steps=total_steps,
            tokens_per_step=tokens_per_step,
            flops_per_token=flops_per_token,
            peak_flops_total=peak * rt.world,
            interval=cfg.run.progress_interval_seconds,
            is_chief=rt.rank == 0,
            extra=extra or {},
            peak_per_worker=peak,
            peak_source=peak_source,
        )
        if reporter.is_chief and cfg.run.mlflow_tracking_uri:
            from .tracking import Tracker

            reporter.tracker = Tracker(cfg, reporter.event)
            reporter.tracker.start()
        return reporter

    def __post_init__(self) -> None:
        global _CURRENT
        self._last_emit = 0.0
        self.ledger: dict[str, float] = {name: 0.0 for name in LEDGER}
        """Seconds of this attempt by what they went to (goodput): `steps` the optimizer steps after
        the first, the others the timed sections (`timed`, `spent`), wherever they happen."""
        self.steps_timed = 0
        self.resumed_from: int | None = None
        """The step this worker group started from, set once its checkpoint restore finished (a
        group that fails inside the restore resumed from nothing: its records carry no
        `resumedFrom`, and goodput takes the attempt's resume step from a group that has one)."""
        self._group = round(time.time(), 3)
        self.in_timed = False
        """Inside a `timed` block (a HF Trainer eval there is already counted)."""
        self._step_mark: float | None = None
        self._timed_since_mark = 0.0
        self._warned_small_eval = False
        self._window_start = time.perf_counter()
        self._window_steps = 0
        self._started = time.perf_counter()
        self.history: list[dict[str, Any]] = []
        self.eval_history: list[dict[str, Any]] = []
        self.tokens_seen = 0
        self.last: dict[str, Any] = {}
        self._gauges = (
            _Gauges({"job": self.job, "namespace": self.namespace, "kind": self.kind})
            if self.is_chief
            else None
        )
        if self.is_chief:
            _CURRENT = self

    # -- the goodput ledger ----------------------------------------------------------------------

    @contextlib.contextmanager
    def timed(self, category: str) -> Iterator[None]:
        """Count the time inside the block as `category` (evaluation, checkpointSave,
        checkpointRestore), not as step time."""
        t0, outer = time.perf_counter(), self.in_timed
        self.in_timed = True
        try:
            yield
        finally:
            self.in_timed = outer
            if not outer:  # a section within a timed one is already counted
                self.spent(category, time.perf_counter() - t0)

    def spent(self, category: str, seconds: float) -> None:
        """Add `seconds` measured elsewhere (e.g. the HF Trainer's eval_runtime) to `category`."""
        seconds = max(0.0, float(seconds))
        self.ledger[category] = self.ledger.get(category, 0.0) + seconds
        self._timed_since_mark += seconds

    def ledger_record(self) -> dict[str, float | int]:
        """The ledger as progress records carry it (seconds to the millisecond)."""
        out: dict[str, float | int] = {k: round(v, 3) for k, v in self.ledger.items()}
        out["stepsTimed"] = self.steps_timed
        if self.resumed_from is not None:
            out["resumedFrom"] = self.resumed_from
        out["group"] = self._group  # a worker group restarted within the Ray job keeps its own ledger
        return out

    def _count_step_time(self, now: float) -> None:
        """The step just finished: the time since the previous one, less what timed sections took
        in between, is step time. The attempt's first step is not (it is start-up: compile, caches,
        the first batch — time to the first step)."""
        if self._step_mark is not None:
            self.ledger["steps"] += max(0.0, now - self._step_mark - self._timed_since_mark)
            self.steps_timed += 1
        self._step_mark, self._timed_since_mark = now, 0.0

    def step(
        self,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float | None = None,
        samples: int = 0,
        tokens: int | None = None,
        force: bool = False,
        **more: Any,
    ) -> None:
        """Record optimizer step `step` (1-based) finished with `loss`."""
        now = time.perf_counter()
        self._count_step_time(now)
        self._window_steps += 1
        self.tokens_seen += tokens if tokens is not None else self.tokens_per_step
        point = {"step": step, "loss": loss, "learning_rate": lr}
        self.history.append(point)
        if not self.is_chief or (
            not force and now - self._last_emit < self.interval and step != self.total_steps
        ):
            return
        elapsed = now - self._window_start
        sec_per_step = elapsed / max(self._window_steps, 1)
        tps = (tokens if tokens is not None else self.tokens_per_step) / sec_per_step if sec_per_step else 0.0
        mfu = tps * self.flops_per_token / self.peak_flops_total if self.peak_flops_total else None
        record = {
            "type": "progress",
            "step": step,
            "total_steps": self.total_steps,
            "loss": round(loss, 6),
            "learning_rate": lr,
            "grad_norm": None if grad_norm is None else round(float(grad_norm), 6),
            "tokens_per_second": round(tps, 2),
            "samples_per_second": round(samples / sec_per_step, 3) if samples and sec_per_step else None,
            "mfu": None if mfu is None else round(mfu, 6),
            "eta_seconds": round(sec_per_step * (self.total_steps - step), 1),
            "tokens_seen": self.tokens_seen,
            "elapsed_seconds": round(now - self._started, 2),
            "ledger": self.ledger_record(),
            **self.extra,
            **more,
        }
        record = {k: v for k, v in record.items() if v is not None}
        emit(record)
        self.last = record
        if self._gauges:
            self._gauges.set(record)
        if self.tracker is not None:
            self.tracker.step(step, record)
        self._last_emit = now
        self._window_start, self._window_steps = now, 0

    def evaluation(self, step: int, metrics: dict[str, float | None]) -> None:
        """An eval record (metrics without a value, e.g. an interval from one sample, left out);
        the first eval too small to trust also gets a warning event saying what to change."""
        if not self.is_chief:
            return
        values = {k: round(float(v), 6) for k, v in metrics.items() if v is not None and math.isfinite(v)}
        entry = {"step": step, **values}
        self.eval_history.append(entry)
        emit({"type": "eval", **entry})
        if self.tracker is not None:
            self.tracker.evaluation(step, values)
        warning = evaluation.eval_size_warning(values)
        if warning and not self._warned_small_eval:
            self._warned_small_eval = True
            self.event(warning, eval_tokens=values.get("eval_tokens"))
        if self._gauges:
            self._gauges.set({"eval_loss": metrics.get("eval_loss")})

    def evaluate(self, step: int, compute: Callable[[], dict[str, float | None]]) -> dict[str, float | None]:
        """Run an eval (`compute`), timed as evaluation, and record it at `step`."""
        with self.timed("evaluation"):
            metrics = compute()
        self.evaluation(step, metrics)
        return metrics

    def event(self, message: str, **fields: Any) -> None:
        if self.is_chief:
            emit({"type": "event", "message": message, **fields})

    def emit_ledger(self, **fields: Any) -> None:
        """A `ledger` record: where this attempt's time went so far (at its end, however it ends)."""
        if self.is_chief:
            emit({"type": "ledger", "ledger": self.ledger_record(), **fields})


LEDGER = ("steps", "evaluation", "checkpointSave", "checkpointRestore")
"""The trainer's goodput categories (the operator adds queued, provisioning, start-up, redone,
stalled and the rest from its own clock)."""

_CURRENT: Reporter | None = None
"""This process's chief reporter, for `ledger_on_failure`."""


def ledger_on_failure(train_loop: Callable[[dict[str, Any]], Any], config: dict[str, Any]) -> Any:
    """Run a recipe's train_loop; when it raises (a preemption's stop after its checkpoint, an
    error), rank 0 first emits its ledger, so the attempt's last checkpoint write and the steps
    since the last progress record are counted."""
    global _CURRENT
    _CURRENT = None
    try:
        return train_loop(config)
    except BaseException:
        if _CURRENT is not None:
            last = _CURRENT.history[-1]["step"] if _CURRENT.history else None
            _CURRENT.emit_ledger(step=last)
            if _CURRENT.tracker is not None:
                _CURRENT.tracker.failed_attempt()
        raise
