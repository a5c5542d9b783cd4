"""Prometheus v3 (built from the Go module proxy: Debian's 2.42 has no Kubernetes SD) outside the
test cluster, finding its targets as in a cluster: Kubernetes service discovery through the real
apiserver (role pod), with the relabelling the chart's ServiceMonitor (the operator,
job="forgeline-operator", its series' own `namespace` honoured) and PodMonitor (the Ray pods,
job="forgeline-ray") give prometheus-operator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from forgeline_operator.dev.cluster import binaries
from forgeline_operator.dev.cluster.controlplane import ADMIN_TOKEN

from .kube import KubeEnv
from .prom import Prometheus


def _pod_job(
    name: str, keep: dict[str, str], labels: dict[str, str], honor: bool, sd: dict[str, Any]
) -> dict[str, Any]:
    relabel: list[dict[str, Any]] = [
        {"source_labels": [f"__meta_kubernetes_pod_label_{k}"], "regex": v, "action": "keep"}
        for k, v in keep.items()
    ]
    relabel += [
        {
            "source_labels": ["__meta_kubernetes_pod_container_port_name"],
            "regex": "metrics",
            "action": "keep",
        },
        {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Running", "action": "keep"},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"target_label": "job", "replacement": name},
    ]
    relabel += [{"source_labels": [src], "target_label": dst} for dst, src in labels.items()]
    return {
        "job_name": name,
        "honor_labels": honor,
        "scrape_interval": "2s",
        "kubernetes_sd_configs": [sd],
        "relabel_configs": relabel,
    }


class KubePrometheus(Prometheus):
    def __init__(self, workdir: Path, env: KubeEnv) -> None:
        super().__init__(workdir)
        self.env = env

    def binary(self) -> str:
        return str(Path(binaries.component("prometheus")["dir"]) / "bin" / "prometheus")

    def scrape_configs(self) -> list[dict[str, Any]]:
        cp = self.env.cluster.control_plane
        assert cp is not None
        (self.workdir / "token").write_text(ADMIN_TOKEN)
        sd = {
            "role": "pod",
            "api_server": cp.url,
            "tls_config": {"ca_file": str(cp.ca_cert)},
            "authorization": {"credentials_file": str(self.workdir / "token")},
        }
        operator = {"app_kubernetes_io_component": "operator", "app_kubernetes_io_name": "forgeline"}
        ray = {"app_kubernetes_io_managed_by": "forgeline"}
        ray_labels = {
            "ray_cluster": "__meta_kubernetes_pod_label_ray_io_cluster",
            "ray_node_type": "__meta_kubernetes_pod_label_ray_io_node_type",
        }
        return [
            _pod_job("forgeline-operator", operator, {}, True, sd),
            _pod_job("forgeline-ray", ray, ray_labels, False, sd),
        ]
