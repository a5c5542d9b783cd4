"""The Forgeline Grafana dashboard, built with grafana-foundation-sdk (no hand-written JSON).

    python -m forgeline_operator.monitoring.dashboard          # (re)write the chart's dashboard
    python -m forgeline_operator.monitoring.dashboard --check  # exit 1 if the file is out of date

The output, helm/forgeline/files/dashboards/forgeline.json, is committed and shipped by the chart
as a ConfigMap for Grafana's dashboard sidecar (`grafana.dashboard.enabled`). tests/test_dashboard.py
keeps it in step with this module; tests/test_operator.py checks every panel query (`panel_queries`)
against a Prometheus that scraped a real operator and Ray.

Five rows: the jobs (forgeline_jobs, phase transitions, restarts), goodput (the fleet's, badput by
category, the worst jobs), the training gauges the operator
relays from running jobs (loss, tokens/s, MFU, progress), the GPUs (Ray's node metrics) and the
operator itself (reconcile latency and errors, Ray submission errors, up). Every panel queries the
Prometheus chosen by the `datasource` variable; the training panels filter on `namespace`.

grafana-foundation-sdk is a dev dependency: only this module imports it, never the operator.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

DEFAULT_OUT = Path("helm/forgeline/files/dashboards/forgeline.json")
UID = "forgeline"
# Every panel (and the namespace variable) queries the Prometheus picked by ${datasource}.
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
JOB_FILTER = '{namespace=~"$namespace"}'
RATE = "$__rate_interval"
HEIGHT = 8


# -- panel helpers ---------------------------------------------------------------------------------


def _query(expr: str, legend: str | None = None, ref_id: str = "A") -> prometheus.Dataquery:
    query = prometheus.Dataquery().expr(expr).ref_id(ref_id).datasource(DATASOURCE).range()
    return query.legend_format(legend) if legend else query


def _timeseries(
    title: str,
    description: str,
    *queries: prometheus.Dataquery,
    width: int,
    unit: str | None = None,
    min_val: float | None = None,
    max_val: float | None = None,
    stacked: bool = False,
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(list(queries))
        .height(HEIGHT)
        .span(width)
        .line_width(1)
        .fill_opacity(60 if stacked else 10)
        .show_points(common.VisibilityMode.NEVER)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(
            common_builders.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
    )
    if stacked:
        panel = panel.stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
    if unit is not None:
        panel = panel.unit(unit)
    if min_val is not None:
        panel = panel.min(min_val)
    if max_val is not None:
        panel = panel.max(max_val)
    return panel


def _stat(
    title: str, description: str, query: prometheus.Dataquery, width: int, thresholds: list[Threshold]
) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets([query])
        .height(HEIGHT)
        .span(width)
        .graph_mode(common.BigValueGraphMode.AREA)
        .color_mode(common.BigValueColorMode.VALUE)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .thresholds(dashboard_builders.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(thresholds))
    )


def _row(title: str) -> dashboard_builders.Row:
    # An expanded row: its panels follow it in the dashboard's panel list (Grafana drops panels
    # nested in a row that is not collapsed), so they are added with Dashboard.with_panel.
    return dashboard_builders.Row(title).collapsed(False)


# -- the rows --------------------------------------------------------------------------------------


def _jobs_row() -> list[Any]:
    return [
        _row("Jobs"),
        _timeseries(
            "Jobs by phase",
            "TrainingJobs and FineTuneJobs the operator knows, by phase (stacked).",
            _query("sum by (phase) (forgeline_jobs)", "{{phase}}"),
            width=7,
            unit="short",
            min_val=0,
            stacked=True,
        ),
        _timeseries(
            "Phase transitions",
            "Jobs entering each phase, per second.",
            _query(f"sum by (phase) (rate(forgeline_job_transitions_total[{RATE}]))", "{{phase}}"),
            width=7,
            unit="ops",
            min_val=0,
        ),
        _timeseries(
            "Failures by reason (1h)",
            "Failed attempts in the last hour by typed reason (OOMKilled, DataError, Stalled, ...): "
            "status.lastFailure of each job says more.",
            _query("sum by (reason) (increase(forgeline_job_failures_total[1h]))", "{{reason}}"),
            width=6,
            unit="short",
            min_val=0,
        ),
        _stat(
            "Job restarts (1h)",
            "Ray job resubmissions after failures in the last hour.",
            _query("sum(increase(forgeline_job_restarts_total[1h]))"),
            width=4,
            thresholds=[Threshold(value=None, color="green"), Threshold(value=1, color="orange")],
        ),
        _timeseries(
            "Time to first step (p50, 1h)",
            "From kubectl apply to the first optimizer step, and its parts: waiting for a slot "
            "(dependencies, the running-jobs cap) and provisioning (the Ray cluster, Kueue); the "
            "rest is the trainer's own start-up. Medians over the jobs that started in the last "
            "hour (status.timings of each job has its own split).",
            _query(_median("forgeline_job_time_to_first_step_seconds"), "to first step", "A"),
            _query(_median("forgeline_job_queue_wait_seconds"), "queued", "B"),
            _query(_median("forgeline_job_provisioning_seconds"), "provisioning", "C"),
            width=24,
            unit="s",
            min_val=0,
        ),
    ]


def _goodput_row() -> list[Any]:
    held = 'category!="queued",namespace=~"$namespace"'
    return [
        _row("Goodput (where the chip-hours went)"),
        _timeseries(
            "Fleet goodput",
            "Productive optimizer steps' share of the time jobs held their chips, over every job "
            "the operator knows (queued time holds nothing and is left out). docs/goodput.md "
            "explains the categories; `forgeline report NAME` prints one job's.",
            _query(
                f'sum(forgeline_job_seconds_total{{category="productive",namespace=~"$namespace"}})'
                f" / sum(forgeline_job_seconds_total{{{held}}})",
                "goodput",
            ),
            width=8,
            unit="percentunit",
            min_val=0,
            max_val=1,
        ),
        _timeseries(
            "Badput by category",
            "Chip-hours that were not productive steps, by category: provisioning, start-up, "
            "redone work, evals, checkpoint writes and restores, stalls, the rest "
            "(GPU-hours, or CPU core-hours for CPU jobs: the unit label).",
            _query(
                'sum by (category, unit) (forgeline_job_chip_hours_total{category!="productive",'
                'namespace=~"$namespace"})',
                "{{category}} ({{unit}})",
            ),
            width=8,
            unit="short",
            min_val=0,
            stacked=True,
        ),
        _timeseries(
            "Worst jobs by goodput",
            "The five jobs with the lowest goodput (status.goodput.display names each one's largest badput).",
            _query(f"bottomk(5, forgeline_job_goodput_ratio{JOB_FILTER})", "{{namespace}}/{{job}}"),
            width=8,
            unit="percentunit",
            min_val=0,
            max_val=1,
        ),
    ]


def _median(histogram: str) -> str:
    return f"histogram_quantile(0.5, sum by (le) (increase({histogram}_bucket[1h])))"


def _training_row() -> list[Any]:
    legend = "{{namespace}}/{{job}}"
    return [
        _row("Training (running jobs)"),
        _timeseries(
            "Training loss",
            "Latest training loss of each running job (relayed from the trainer's progress).",
            _query(f"forgeline_job_loss{JOB_FILTER}", legend),
            width=12,
        ),
        _timeseries(
            "Tokens per second",
            "Training throughput of each running job, in tokens per second.",
            _query(f"forgeline_job_tokens_per_second{JOB_FILTER}", legend),
            width=12,
            unit="short",
            min_val=0,
        ),
        _timeseries(
            "MFU",
            "Model FLOPs utilisation of each running job (achieved / peak FLOPs).",
            _query(f"forgeline_job_mfu{JOB_FILTER}", legend),
            width=12,
            unit="percentunit",
            min_val=0,
        ),
        _timeseries(
            "Progress",
            "Optimizer steps done / planned, for each running job.",
            _query(f"forgeline_job_progress_ratio{JOB_FILTER}", legend),
            width=12,
            unit="percentunit",
            min_val=0,
            max_val=1,
        ),
        _timeseries(
            "GPU-hours (used, projected)",
            "GPU-hours each job has held so far (used) and will have held at the end at its current "
            "pace (projected); spec.budget.maxGpuHours stops a job at its limit.",
            _query(f"forgeline_job_gpu_hours{JOB_FILTER}", legend + " {{stage}}"),
            width=12,
            unit="short",
            min_val=0,
        ),
        _timeseries(
            "Cost (spent, projected)",
            "Cost so far and projected to the end, at the node pool's price per GPU-hour "
            "(FORGELINE_NODE_POOLS pricePerGpuHour or FORGELINE_PRICE_PER_GPU_HOUR), in FORGELINE_CURRENCY.",
            _query(f"forgeline_job_cost{JOB_FILTER}", legend + " {{stage}}"),
            width=12,
            unit="short",
            min_val=0,
        ),
    ]


def _gpus_row() -> list[Any]:
    return [
        _row("GPUs (Ray node metrics)"),
        _timeseries(
            "GPU utilisation",
            "Utilisation of each GPU of the Ray nodes (ray_node_gpus_utilization).",
            _query(
                "avg by (instance, GpuIndex) (ray_node_gpus_utilization)", "{{instance}} GPU {{GpuIndex}}"
            ),
            width=8,
            unit="percent",
            min_val=0,
            max_val=100,
        ),
        _timeseries(
            "GPU memory used",
            "GPU memory used on each GPU of the Ray nodes (Ray reports MiB).",
            _query(
                "sum by (instance, GpuIndex) (ray_node_gram_used) * 1024 * 1024",
                "{{instance}} GPU {{GpuIndex}}",
            ),
            width=8,
            unit="bytes",
            min_val=0,
        ),
        _timeseries(
            "GPU memory used / available",
            "Share of all the Ray nodes' GPU memory in use.",
            _query(
                "sum(ray_node_gram_used) / (sum(ray_node_gram_used) + sum(ray_node_gram_available))", "used"
            ),
            width=8,
            unit="percentunit",
            min_val=0,
            max_val=1,
        ),
    ]


def _operator_row() -> list[Any]:
    def quantile(q: float) -> str:
        rate = f"rate(forgeline_reconcile_duration_seconds_bucket[{RATE}])"
        return f"histogram_quantile({q}, sum by (le) ({rate}))"

    return [
        _row("Operator"),
        _timeseries(
            "Reconcile latency",
            "Duration of one job reconcile, 50th and 95th percentiles.",
            _query(quantile(0.5), "p50", "A"),
            _query(quantile(0.95), "p95", "B"),
            width=8,
            unit="s",
            min_val=0,
        ),
        _timeseries(
            "Reconcile errors",
            "Reconciles that raised, per second, by job kind.",
            _query(f"sum by (kind) (rate(forgeline_reconcile_errors_total[{RATE}]))", "{{kind}}"),
            width=6,
            unit="ops",
            min_val=0,
        ),
        _timeseries(
            "Ray submission errors",
            "Failed Ray job submissions, per second, by job kind.",
            _query(f"sum by (kind) (rate(forgeline_ray_submission_errors_total[{RATE}]))", "{{kind}}"),
            width=6,
            unit="ops",
            min_val=0,
        ),
        _stat(
            "Operator up",
            "Whether Prometheus can scrape the operator's metrics endpoint.",
            _query('max(up{job=~".*forgeline.*"})'),
            width=4,
            thresholds=[Threshold(value=None, color="red"), Threshold(value=1, color="green")],
        ).mappings(
            [
                ValueMap(
                    {
                        "0": ValueMappingResult(text="DOWN", color="red", index=0),
                        "1": ValueMappingResult(text="UP", color="green", index=1),
                    }
                )
            ]
        ),
    ]


# -- the dashboard ---------------------------------------------------------------------------------


def _builder() -> dashboard_builders.Dashboard:
    builder = (
        dashboard_builders.Dashboard("Forgeline")
        .uid(UID)
        .description("Forgeline training jobs, their training metrics, the Ray GPUs and the operator.")
        .tags(["forgeline"])
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .with_variable(
            dashboard_builders.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(
            dashboard_builders.QueryVariable("namespace")
            .label("Namespace")
            .datasource(DATASOURCE)
            .query("label_values(forgeline_job_progress_ratio, namespace)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(VariableOption(selected=True, text="All", value="$__all"))
        )
    )
    next_id = 1
    for item in (*_jobs_row(), *_goodput_row(), *_training_row(), *_gpus_row(), *_operator_row()):
        item.id(next_id)
        next_id += 1
        builder = (
            builder.with_row(item) if isinstance(item, dashboard_builders.Row) else builder.with_panel(item)
        )
    return builder


def build_dashboard() -> dict[str, Any]:
    """The dashboard as plain JSON data (what Grafana imports)."""
    return json.loads(json.dumps(_builder().build(), cls=JSONEncoder))


def render(dashboard: dict[str, Any]) -> str:
    """The committed file's text: sorted keys, two-space indent, a trailing newline."""
    return json.dumps(dashboard, sort_keys=True, indent=2) + "\n"


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every non-row panel, rows' nested panels included, in dashboard order."""
    found = []
    for panel in panels:
        if panel.get("type") == "row":
            found.extend(_panels(panel.get("panels") or []))
        else:
            found.append(panel)
            found.extend(_panels(panel.get("panels") or []))
    return found


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every target of every panel of a dashboard's JSON."""
    return [
        (panel.get("title", ""), target["expr"])
        for panel in _panels(dashboard.get("panels") or [])
        for target in panel.get("targets") or []
        if target.get("expr")
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m forgeline_operator.monitoring.dashboard",
        description="Write the Forgeline Grafana dashboard JSON.",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output file (default: {DEFAULT_OUT})")
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the file differs from what would be written",
    )
    args = parser.parse_args(argv)
    text = render(build_dashboard())
    if args.check:
        current = args.out.read_text() if args.out.is_file() else None
        if current != text:
            print(f"{args.out}: out of date: run `make dashboards`", file=sys.stderr)
            return 1
        print(f"{args.out}: up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
