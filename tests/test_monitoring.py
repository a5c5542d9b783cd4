"""The shipped alert rules, checked with Debian's promtool: syntax (`check rules`) and behaviour
(`test rules`: each alert fires on the series that should trip it, not before its `for:`, and not
on the healthy series next to it). The dashboard's queries are run against a real Prometheus in
tests/test_operator.py (test_every_dashboard_panel_has_data_in_prometheus)."""

from __future__ import annotations

import subprocess

import yaml

from forgeline_operator.dev.cluster import find_binary

from .conftest import REPO
from .prom import RULES

ALERT_TESTS = REPO / "tests/prometheus/forgeline-alerts.test.yaml"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_binary("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=ALERT_TESTS.parent
    )


def test_promtool_checks_the_rules() -> None:
    proc = _promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 5 rules found" in proc.stdout


def test_promtool_unit_tests_of_every_alert() -> None:
    proc = _promtool("test", "rules", ALERT_TESTS.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = {
        t["alertname"]
        for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for t in case["alert_rule_test"]
        if t["exp_alerts"]
    }
    shipped = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert tested == shipped, f"alerts without a firing test: {shipped - tested}"


def test_promtool_rejects_a_broken_rule(tmp_path) -> None:
    """The check above could fail: a rule with bad PromQL is refused."""
    rules = yaml.safe_load(RULES.read_text())
    rules["groups"][0]["rules"][0]["expr"] = "sum by (kind) (increase(forgeline_job_transitions_total[10m]"
    bad = tmp_path / "bad.rules.yaml"
    bad.write_text(yaml.safe_dump(rules))
    proc = _promtool("check", "rules", str(bad))
    assert proc.returncode != 0
    assert "unclosed left parenthesis" in proc.stdout + proc.stderr
