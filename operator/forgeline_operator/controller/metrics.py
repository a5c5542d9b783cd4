"""Operator metrics (prometheus-client), served on FORGELINE_METRICS_PORT at /metrics.

Per-job training gauges are relayed from the trainer's progress records, so this one scrape
target feeds the dashboard even where the Ray pods are not scraped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..api.status import FAILURE_REASONS, PHASES

REGISTRY = CollectorRegistry(auto_describe=True)

TRANSITIONS = Counter(
    "forgeline_job_transitions_total", "Job phase transitions", ["kind", "phase"], registry=REGISTRY
)
RECONCILE = Histogram(
    "forgeline_reconcile_duration_seconds",
    "Duration of one job reconcile",
    ["kind"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RECONCILE_ERRORS = Counter(
    "forgeline_reconcile_errors_total", "Reconciles that raised", ["kind"], registry=REGISTRY
)
SUBMIT_ERRORS = Counter(
    "forgeline_ray_submission_errors_total", "Failed Ray job submissions", ["kind"], registry=REGISTRY
)
RESTARTS = Counter(
    "forgeline_job_restarts_total", "Ray job resubmissions after failures", ["kind"], registry=REGISTRY
)
FAILURES = Counter(
    "forgeline_job_failures_total",
    "Failed attempts (Ray jobs) by typed reason",
    ["kind", "reason"],
    registry=REGISTRY,
)
_STARTUP_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
TIME_TO_FIRST_STEP = Histogram(
    "forgeline_job_time_to_first_step_seconds",
    "From the job's creation to its first optimizer step",
    ["kind"],
    registry=REGISTRY,
    buckets=_STARTUP_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "forgeline_job_queue_wait_seconds",
    "From the job's creation to its admission (dependencies, the running-jobs cap)",
    ["kind"],
    registry=REGISTRY,
    buckets=_STARTUP_BUCKETS,
)
PROVISIONING = Histogram(
    "forgeline_job_provisioning_seconds",
    "From admission to the first Ray job submission (the Ray cluster, Kueue)",
    ["kind"],
    registry=REGISTRY,
    buckets=_STARTUP_BUCKETS,
)
_JOB_LABELS = ["namespace", "job", "kind"]
LOSS = Gauge("forgeline_job_loss", "Latest training loss", _JOB_LABELS, registry=REGISTRY)
TOKENS = Gauge(
    "forgeline_job_tokens_per_second", "Training tokens per second", _JOB_LABELS, registry=REGISTRY
)
MFU = Gauge("forgeline_job_mfu", "Model FLOPs utilisation (0-1)", _JOB_LABELS, registry=REGISTRY)
PROGRESS = Gauge(
    "forgeline_job_progress_ratio", "Optimizer steps done / planned", _JOB_LABELS, registry=REGISTRY
)
EVAL_LOSS = Gauge("forgeline_job_eval_loss", "Latest evaluation loss", _JOB_LABELS, registry=REGISTRY)
GPU_HOURS = Gauge(
    "forgeline_job_gpu_hours",
    "GPU-hours held: stage=used (so far) and stage=projected (at the current pace, to the end)",
    [*_JOB_LABELS, "stage"],
    registry=REGISTRY,
)
COST = Gauge(
    "forgeline_job_cost",
    "Cost at the node pool's price per GPU-hour: stage=used and stage=projected",
    [*_JOB_LABELS, "stage"],
    registry=REGISTRY,
)

# Counters exist at 0 from the start, so `rate()` in dashboards and alerts has a series to work on
# (a labelled counter that never fired has none, and "no data" reads like a broken scrape).
for _kind in ("TrainingJob", "FineTuneJob"):
    for _counter in (RECONCILE_ERRORS, SUBMIT_ERRORS, RESTARTS):
        _counter.labels(_kind)
    for _phase in PHASES:  # the "job failed" alert needs the 0 before the first failure
        TRANSITIONS.labels(_kind, _phase)
    for _reason in FAILURE_REASONS:
        FAILURES.labels(_kind, _reason)
    for _histogram in (TIME_TO_FIRST_STEP, QUEUE_WAIT, PROVISIONING):  # increase() needs the 0
        _histogram.labels(_kind)


class _PhaseCollector:
    """forgeline_jobs{kind, phase}: counted at scrape time from the operator's in-memory index."""

    def __init__(self, source: Callable[[], dict[tuple[str, str], int]]) -> None:
        self.source = source

    def collect(self) -> Any:
        family = GaugeMetricFamily("forgeline_jobs", "Jobs by kind and phase", labels=["kind", "phase"])
        for (kind, phase), n in sorted(self.source().items()):
            family.add_metric([kind, phase], n)
        yield family


def register_phase_source(source: Callable[[], dict[tuple[str, str], int]]) -> None:
    REGISTRY.register(_PhaseCollector(source))


EVAL_METRIC = Gauge(
    "forgeline_job_eval",
    "Held-out evaluation metrics: stage=before (the step-0 baseline) and stage=after (the latest eval)",
    ["namespace", "job", "kind", "metric", "stage"],
    registry=REGISTRY,
)
_EVAL_RELAYED = (
    "eval_loss",
    "perplexity",
    "accuracy",
    "preference_accuracy",
    "preference_ties",
    "reward_margin",
    "mean_reward",
)


def relay_progress(namespace: str, job: str, kind: str, progress: dict[str, Any]) -> None:
    labels = (namespace, job, kind)
    for gauge, key in ((LOSS, "loss"), (TOKENS, "tokensPerSecond"), (MFU, "mfu")):
        if isinstance(progress.get(key), (int, float)):
            gauge.labels(*labels).set(progress[key])
    if progress.get("totalSteps"):
        PROGRESS.labels(*labels).set(progress.get("step", 0) / progress["totalSteps"])
    eval_loss = (progress.get("evalMetrics") or {}).get("eval_loss")
    if isinstance(eval_loss, (int, float)):
        EVAL_LOSS.labels(*labels).set(eval_loss)
    for stage, values in (("before", progress.get("evalBaseline")), ("after", progress.get("evalMetrics"))):
        for metric in _EVAL_RELAYED:
            value = (values or {}).get(metric)
            if isinstance(value, (int, float)):
                EVAL_METRIC.labels(*labels, metric, stage).set(value)


def relay_cost(namespace: str, job: str, kind: str, cost: Any) -> None:
    """A `costs.Cost`: GPU-hours and cost, used and projected (those that are known)."""
    for gauge, used, projected in (
        (GPU_HOURS, cost.gpu_hours, cost.projected_gpu_hours),
        (COST, cost.cost, cost.projected_cost),
    ):
        for stage, value in (("used", used), ("projected", projected)):
            if value is not None:
                gauge.labels(namespace, job, kind, stage).set(value)


class _GoodputCollector:
    """forgeline_job_seconds_total{category} and forgeline_job_chip_hours{category} (counters: a
    job's seconds in a category only grow) and forgeline_job_goodput_ratio, from each job's latest
    status.goodput (`relay_goodput`)."""

    def __init__(self) -> None:
        self.jobs: dict[tuple[str, str, str], dict[str, Any]] = {}

    def collect(self) -> Any:
        labels = [*_JOB_LABELS, "category"]
        seconds = CounterMetricFamily(
            "forgeline_job_seconds", "Job wall seconds by goodput category (docs/goodput.md)", labels=labels
        )
        hours = CounterMetricFamily(
            "forgeline_job_chip_hours",
            "Job GPU-hours (CPU core-hours on a CPU pool: unit) by goodput category; queued holds none",
            labels=[*labels, "unit"],
        )
        ratio = GaugeMetricFamily(
            "forgeline_job_goodput_ratio",
            "Productive steps / the time the job held its chips",
            labels=_JOB_LABELS,
        )
        for key, g in list(self.jobs.items()):
            chips, unit = float(g.get("chips") or 0.0), str(g.get("chipUnit") or "")
            for category, value in (g.get("seconds") or {}).items():
                seconds.add_metric([*key, category], float(value))
                if category != "queued":
                    hours.add_metric([*key, category, unit], float(value) * chips / 3600)
            if isinstance(g.get("fraction"), (int, float)):
                ratio.add_metric(list(key), float(g["fraction"]))
        yield seconds
        yield hours
        yield ratio


_GOODPUT = _GoodputCollector()
REGISTRY.register(_GOODPUT)


def relay_goodput(namespace: str, job: str, kind: str, goodput: dict[str, Any]) -> None:
    """A job's status.goodput, for the next scrape."""
    _GOODPUT.jobs[(namespace, job, kind)] = goodput


def observe_startup(kind: str, timings: dict[str, Any]) -> None:
    """The job's start-up split (decisions.startup_timings), once, at its first step."""
    TIME_TO_FIRST_STEP.labels(kind).observe(timings["timeToFirstStepSeconds"])
    QUEUE_WAIT.labels(kind).observe(timings["queuedSeconds"])
    PROVISIONING.labels(kind).observe(timings["provisioningSeconds"])


def forget_job(namespace: str, job: str, kind: str) -> None:
    _GOODPUT.jobs.pop((namespace, job, kind), None)
    for gauge in (LOSS, TOKENS, MFU, PROGRESS, EVAL_LOSS):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, job, kind)
    for metric in _EVAL_RELAYED:
        for stage in ("before", "after"):
            with contextlib.suppress(KeyError):
                EVAL_METRIC.remove(namespace, job, kind, metric, stage)
    for gauge in (GPU_HOURS, COST):
        for stage in ("used", "projected"):
            with contextlib.suppress(KeyError):
                gauge.remove(namespace, job, kind, stage)


def serve(port: int) -> None:
    start_http_server(port, registry=REGISTRY)
