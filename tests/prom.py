"""A real Prometheus (Debian's `prometheus` binary) for the tests: scrapes given targets every
second, loads the shipped alert rules, and answers PromQL over its HTTP API.

Targets live in a file_sd file, so a test can add one (another operator) while it runs.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from forgeline_operator.dev.cluster import find_binary
from forgeline_operator.rayclient.ports import free_port

from .conftest import CHART

RULES = CHART / "files/alerts/forgeline.rules.yaml"


class Prometheus:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.targets: dict[str, list[str]] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def add_target(self, job: str, address: str) -> None:
        self.targets.setdefault(job, []).append(address)
        groups = [{"targets": addrs, "labels": {"job": job}} for job, addrs in self.targets.items()]
        tmp = self.workdir / "targets.json.tmp"
        tmp.write_text(json.dumps(groups))
        tmp.replace(self.workdir / "targets.json")  # atomic: Prometheus never reads half a file

    def binary(self) -> str:
        return find_binary("prometheus")

    def scrape_configs(self) -> list[dict[str, Any]]:
        """The file_sd targets that add_target writes."""
        return [
            {
                "job_name": "file",
                "file_sd_configs": [
                    {"files": [str(self.workdir / "targets.json")], "refresh_interval": "1s"}
                ],
            }
        ]

    def start(self) -> None:
        if not (self.workdir / "targets.json").exists():
            (self.workdir / "targets.json").write_text("[]")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": self.scrape_configs(),
        }
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        log = open(self.workdir / "prometheus.log", "wb")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [
                self.binary(),
                f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_tail()
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        self.started_at = time.time()
                        return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(self.log_tail())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def log_tail(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")[-3000:]

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=30) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query_range(self, expr: str, start: float, end: float, step: float = 5) -> list[dict[str, Any]]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def active_targets(self) -> list[dict[str, Any]]:
        return self.api("targets")["activeTargets"]


class GpuStandIn:
    """Ray's GPU node metrics, for machines without a GPU: ray_node_gpus_utilization,
    ray_node_gram_used and ray_node_gram_available with the labels Ray's reporter agent gives
    them (ray/dashboard/modules/reporter/reporter_agent.py). On a machine with a GPU the Ray
    head exports the real ones and this is not started."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self.registry = CollectorRegistry()
        labels = ["ip", "SessionName", "GpuIndex", "GpuDeviceName"]
        self.util = Gauge(
            "ray_node_gpus_utilization", "Total GPUs usage on a ray node", labels, registry=self.registry
        )
        self.used = Gauge(
            "ray_node_gram_used", "Total GPU RAM usage on a ray node", labels, registry=self.registry
        )
        self.avail = Gauge(
            "ray_node_gram_available", "Total GPU RAM available on a ray node", labels, registry=self.registry
        )
        for i in range(2):
            tags = ("127.0.0.1", "session_test", str(i), "NVIDIA H100 80GB HBM3")
            self.util.labels(*tags).set(87.5 - i)
            self.used.labels(*tags).set(61_000 + i)
            self.avail.labels(*tags).set(81_559 - 61_000 - i)
        self.port = free_port()
        self.server, self.thread = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)

    def stop(self) -> None:
        self.server.shutdown()
