"""What a cluster needs beyond its nodes: cluster DNS (CoreDNS as pods, behind the kube-dns Service),
storage for `pvc://` URIs, and the controllers Forgeline works with (KubeRay; Kueue), which run out
of cluster as host processes, as KubeRay's own development docs run its operator."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from ...rayclient.ports import free_port
from .binaries import find_binary
from .node import CLUSTER_DNS_IP, CLUSTER_DOMAIN

COREFILE = f"""\
.:53 {{
    errors
    health {{
        lameduck 5s
    }}
    ready
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }}
    prometheus :9153
    cache 30
    loop
    reload
    loadbalance
}}
"""
"""CoreDNS as kubeadm configures it, minus `forward`: a name outside the cluster does not resolve
(nothing leaves the test network)."""


def coredns_manifests(image: str) -> list[dict[str, Any]]:
    """kube-system/coredns: ServiceAccount, RBAC, Corefile, Deployment and the kube-dns Service at
    the kubelets' clusterDNS address (as kubeadm installs it)."""
    ns = "kube-system"
    labels = {"k8s-app": "kube-dns"}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "coredns", "namespace": ns}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "system:coredns"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "system:coredns"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:coredns",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": ns}],
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "coredns", "namespace": ns},
            "data": {"Corefile": COREFILE},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "coredns", "namespace": ns, "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": "coredns",
                        "priorityClassName": "system-cluster-critical",
                        "dnsPolicy": "Default",
                        "containers": [
                            {
                                "name": "coredns",
                                "image": image,
                                "imagePullPolicy": "IfNotPresent",
                                "args": ["-conf", "/etc/coredns/Corefile"],
                                "ports": [
                                    {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                    {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                                    {"name": "metrics", "containerPort": 9153, "protocol": "TCP"},
                                ],
                                "resources": {
                                    "requests": {"cpu": "50m", "memory": "70Mi"},
                                    "limits": {"memory": "170Mi"},
                                },
                                "volumeMounts": [
                                    {"name": "config", "mountPath": "/etc/coredns", "readOnly": True}
                                ],
                                "readinessProbe": {
                                    "httpGet": {"path": "/ready", "port": 8181},
                                    "periodSeconds": 2,
                                },
                                "livenessProbe": {
                                    "httpGet": {"path": "/health", "port": 8080},
                                    "periodSeconds": 10,
                                },
                                "securityContext": {
                                    "allowPrivilegeEscalation": False,
                                    "capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]},
                                    "readOnlyRootFilesystem": True,
                                },
                            }
                        ],
                        "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": ns, "labels": labels},
            "spec": {
                "clusterIP": CLUSTER_DNS_IP,
                "selector": labels,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                    {"name": "metrics", "port": 9153, "protocol": "TCP"},
                ],
            },
        },
    ]


STORAGE_CLASS = "standard"


def storage_class() -> dict[str, Any]:
    """`standard`, the name kind's default class has: statically provided volumes (hostPath_volume)."""
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": STORAGE_CLASS,
            "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
        },
        "provisioner": "kubernetes.io/no-provisioner",
        "volumeBindingMode": "Immediate",
        "reclaimPolicy": "Delete",
    }


def hostpath_volume(
    name: str, path: Path, size: str, claim_namespace: str, claim_name: str
) -> dict[str, Any]:
    """A PersistentVolume on a directory of this machine, bound to one claim, as kind's local-path
    provisioner makes them. Every node of the test cluster shares this machine's disk, so the volume
    is ReadWriteMany, as a team's NFS or Filestore share would be for a head and workers on several
    nodes."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": {"forgeline.dev/test-volume": "true"}},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": ["ReadWriteMany", "ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": STORAGE_CLASS,
            "claimRef": {"namespace": claim_namespace, "name": claim_name},
            "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
        },
    }


class HostController:
    """A controller run out of cluster as a host process with the admin kubeconfig (KubeRay, Kueue),
    healthy once its /healthz (or /readyz) answers."""

    def __init__(
        self, name: str, argv: list[str], log: Path, health_url: str, env: dict[str, str] | None = None
    ) -> None:
        self.name, self.argv, self.log, self.health_url = name, argv, log, health_url
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.health_url, timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = self.log.read_text(errors="replace")[-3000:]
                    self.stop()
                    raise RuntimeError(
                        f"{self.name} did not become healthy ({self.health_url}):\n{tail}"
                    ) from None
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def kuberay_operator(kubeconfig: Path, log: Path) -> HostController:
    """KubeRay's operator out of cluster, as its DEVELOPMENT.md runs it: leader election off (else
    controller-runtime wants a namespace for the lease), metrics and probes on loopback ports. Probe
    and init-container injection stay on: what KubeRay puts in Ray pods is what this cluster tests.
    Its Ray dashboard client (RayJob status; the RayCluster controller makes no such calls) goes
    through the apiserver's services/proxy (`--use-kubernetes-proxy`, KubeRay's flag for running
    out of cluster): this machine resolves no cluster DNS names."""
    metrics, health = free_port(), free_port()
    return HostController(
        "kuberay-operator",
        [
            find_binary("ray-operator"),
            "--enable-leader-election=false",
            f"--metrics-addr=127.0.0.1:{metrics}",
            f"--health-probe-bind-address=127.0.0.1:{health}",
            "--log-stdout-encoder=console",
            "--use-kubernetes-proxy",
        ],
        log,
        f"http://127.0.0.1:{health}/healthz",
        env={"KUBECONFIG": str(kubeconfig)},
    )


# -- Kueue -------------------------------------------------------------------------------------

KUEUE_NAMESPACE = "kueue-system"
# Kueue's own types and the RayCluster integration: the webhooks this cluster registers (the
# module's manifest also serves batch Jobs, pods, Deployments, ... which this cluster leaves alone)
_KUEUE_WEBHOOK_PATHS = ("-kueue-x-k8s-io-", "-ray-io-v1-raycluster")


def kueue_config(webhook_host: str, webhook_port: int, cert_dir: Path) -> dict[str, Any]:
    """Kueue's Configuration for a manager run out of cluster: the RayCluster integration only,
    leader election off, its webhook on the host bridge with a certificate from the cluster's PKI
    (internal cert management off: it would issue for the in-cluster Service's DNS name),
    health and metrics on loopback."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": KUEUE_NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{free_port()}"},
        "metrics": {"bindAddress": f"127.0.0.1:{free_port()}"},
        "webhook": {"host": webhook_host, "port": webhook_port, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "integrations": {"frameworks": ["ray.io/raycluster"]},
    }


def kueue_webhooks(manifests: Path, url_base: str, ca_bundle: str) -> list[dict[str, Any]]:
    """Kueue's mutating and validating webhook configurations from its module, cut to its own types
    and RayClusters, each pointed at `url_base` + its path with the cluster CA as caBundle."""
    out = []
    for doc in yaml.safe_load_all(manifests.read_text()):
        if not doc or not doc.get("kind", "").endswith("WebhookConfiguration"):
            continue
        hooks = []
        for hook in doc.get("webhooks", []):
            path = hook["clientConfig"]["service"]["path"]
            if any(p in path for p in _KUEUE_WEBHOOK_PATHS):
                hooks.append({**hook, "clientConfig": {"url": url_base + path, "caBundle": ca_bundle}})
        name = "kueue-" + doc["metadata"]["name"]
        out.append(
            {
                "apiVersion": doc["apiVersion"],
                "kind": doc["kind"],
                "metadata": {"name": name},
                "webhooks": hooks,
            }
        )
    return out


def kueue_manager(
    kubeconfig: Path, config: dict[str, Any], workdir: Path, metrics_cert: Path, metrics_key: Path
) -> HostController:
    """Kueue's manager out of cluster. With internal cert management off it reads its metrics
    certificate from a fixed path, /etc/kueue/metrics/certs; it runs in a private mount namespace
    whose /etc is an overlay adding that directory, so nothing is written to this machine's /etc.
    The on-demand visibility API server (an aggregated API) is off."""
    upper, work = workdir / "etc-upper", workdir / "etc-work"
    certs = upper / "kueue" / "metrics" / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    (certs / "tls.crt").write_bytes(metrics_cert.read_bytes())
    (certs / "tls.key").write_bytes(metrics_key.read_bytes())
    config_file = workdir / "kueue-config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    overlay = f"lowerdir=/etc,upperdir={upper},workdir={work}"
    script = f'mount -t overlay overlay -o "{overlay}" /etc && exec "$0" "$@"'
    health = config["health"]["healthProbeBindAddress"]
    return HostController(
        "kueue",
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            find_binary("kueue"),
            f"--config={config_file}",
            "--feature-gates=VisibilityOnDemand=false",
        ],  # fmt: skip
        workdir / "kueue.log",
        f"http://{health}/readyz",
        env={"KUBECONFIG": str(kubeconfig)},
    )
