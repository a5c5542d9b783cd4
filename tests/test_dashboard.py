"""The Grafana dashboard as code (forgeline_operator.monitoring.dashboard): the committed JSON is
what the builder makes, and every panel queries the ${datasource} Prometheus for a known metric."""

from __future__ import annotations

import json
import re

from forgeline_operator.monitoring.dashboard import build_dashboard, main, panel_queries, render

from .conftest import CHART

SHIPPED = CHART / "files/dashboards/forgeline.json"

EXPECTED_TITLES = [
    "Jobs by phase",
    "Phase transitions",
    "Failures by reason (1h)",
    "Job restarts (1h)",
    "Time to first step (p50, 1h)",
    "Fleet goodput",
    "Badput by category",
    "Worst jobs by goodput",
    "Training loss",
    "Tokens per second",
    "MFU",
    "Progress",
    "GPU-hours (used, projected)",
    "Cost (spent, projected)",
    "GPU utilisation",
    "GPU memory used",
    "GPU memory used / available",
    "Reconcile latency",
    "Reconcile errors",
    "Ray submission errors",
    "Operator up",
]
EXPECTED_METRICS = {
    "forgeline_jobs",
    "forgeline_job_transitions_total",
    "forgeline_job_failures_total",
    "forgeline_job_restarts_total",
    "forgeline_job_time_to_first_step_seconds_bucket",
    "forgeline_job_queue_wait_seconds_bucket",
    "forgeline_job_provisioning_seconds_bucket",
    "forgeline_job_seconds_total",
    "forgeline_job_chip_hours_total",
    "forgeline_job_goodput_ratio",
    "forgeline_job_loss",
    "forgeline_job_tokens_per_second",
    "forgeline_job_mfu",
    "forgeline_job_progress_ratio",
    "forgeline_job_gpu_hours",
    "forgeline_job_cost",
    "ray_node_gpus_utilization",
    "ray_node_gram_used",
    "ray_node_gram_available",
    "forgeline_reconcile_duration_seconds_bucket",
    "forgeline_reconcile_errors_total",
    "forgeline_ray_submission_errors_total",
    "up",
}
# Words in the expressions that are PromQL (functions, aggregations, keywords), not metrics.
PROMQL_WORDS = {"sum", "avg", "max", "by", "rate", "increase", "histogram_quantile", "bottomk"}


def _panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _metrics(expr: str) -> set[str]:
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"by \([^)]*\)", "", expr)  # grouping labels
    return {w for w in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr)} - PROMQL_WORDS


def test_committed_dashboard_is_up_to_date() -> None:
    assert SHIPPED.read_text() == render(build_dashboard()), (
        f"{SHIPPED} is out of date with forgeline_operator.monitoring.dashboard: run `make dashboards`"
    )


def test_check_flag_detects_drift(tmp_path, capsys) -> None:
    out = tmp_path / "dashboard.json"
    assert main(["--check", "--out", str(out)]) == 1  # missing
    assert main(["--out", str(out)]) == 0
    text = out.read_text()
    assert text.endswith("}\n") and json.loads(text) == build_dashboard()
    assert main(["--check", "--out", str(out)]) == 0
    out.write_text(text.replace('"30s"', '"1m"'))
    capsys.readouterr()
    assert main(["--check", "--out", str(out)]) == 1
    assert "out of date: run `make dashboards`" in capsys.readouterr().err


def test_dashboard_identity_and_variables() -> None:
    dashboard = build_dashboard()
    assert dashboard["uid"] == "forgeline"
    assert dashboard["title"] == "Forgeline"
    assert dashboard["tags"] == ["forgeline"]
    assert dashboard["refresh"] == "30s"
    assert dashboard["time"] == {"from": "now-6h", "to": "now"}
    assert dashboard["timezone"] == "browser"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    namespace = variables["namespace"]
    assert namespace["type"] == "query"
    assert namespace["query"] == "label_values(forgeline_job_progress_ratio, namespace)"
    assert namespace["multi"] is True and namespace["includeAll"] is True
    assert namespace["allValue"] == ".*"
    assert namespace["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_every_panel_has_a_title_a_description_the_datasource_and_a_query() -> None:
    for panel in _panels(build_dashboard()):
        title = panel.get("title")
        assert title, panel
        assert panel.get("description"), title
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert panel.get("targets"), title
        assert any(t.get("expr", "").strip() for t in panel["targets"]), title
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert [t["refId"] for t in panel["targets"]] == sorted({t["refId"] for t in panel["targets"]}), title


def test_panel_titles_are_unique_and_expected() -> None:
    titles = [p["title"] for p in _panels(build_dashboard())]
    assert titles == EXPECTED_TITLES
    assert len(set(titles)) == len(titles)


def test_panel_ids_are_unique() -> None:
    ids = [p["id"] for p in build_dashboard()["panels"]]
    assert len(set(ids)) == len(ids)


def test_rows_are_expanded_with_their_panels_after_them() -> None:
    dashboard = build_dashboard()
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    assert [r["title"] for r in rows] == [
        "Jobs",
        "Goodput (where the chip-hours went)",
        "Training (running jobs)",
        "GPUs (Ray node metrics)",
        "Operator",
    ]
    for row in rows:
        assert row["collapsed"] is False and row["panels"] == []


def test_panels_fit_the_grid_without_overlapping() -> None:
    cells: set[tuple[int, int]] = set()
    for panel in build_dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        mine = {
            (x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_panel_queries_cover_the_expected_metrics() -> None:
    queries = panel_queries(build_dashboard())
    assert {title for title, _ in queries} == set(EXPECTED_TITLES)
    assert len(queries) == len(EXPECTED_TITLES) + 3  # Reconcile latency: p50, p95; time to first step: 3
    metrics = set().union(*(_metrics(expr) for _, expr in queries))
    assert metrics == EXPECTED_METRICS
    rates = [expr for _, expr in queries if "rate(" in expr]
    assert rates and all("[$__rate_interval]" in expr for expr in rates)


def test_panel_queries_walks_collapsed_rows_too() -> None:
    dashboard = {
        "panels": [
            {
                "type": "row",
                "title": "r",
                "collapsed": True,
                "panels": [
                    {"type": "timeseries", "title": "inner", "targets": [{"refId": "A", "expr": "up"}]}
                ],
            },
            {
                "type": "stat",
                "title": "outer",
                "targets": [{"refId": "A", "expr": "vector(1)"}, {"refId": "B"}],
            },
        ]
    }
    assert panel_queries(dashboard) == [("inner", "up"), ("outer", "vector(1)")]


def test_expected_queries_are_exact() -> None:
    queries = dict(panel_queries(build_dashboard()))
    assert queries["Jobs by phase"] == "sum by (phase) (forgeline_jobs)"
    assert queries["GPU memory used"] == "sum by (instance, GpuIndex) (ray_node_gram_used) * 1024 * 1024"
    assert queries["Operator up"] == 'max(up{job=~".*forgeline.*"})'
    assert queries["Training loss"] == 'forgeline_job_loss{namespace=~"$namespace"}'
    worst = 'bottomk(5, forgeline_job_goodput_ratio{namespace=~"$namespace"})'
    assert queries["Worst jobs by goodput"] == worst
