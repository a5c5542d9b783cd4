"""The test cluster, built here and run as host processes: a Kubernetes control plane on loopback
(`controlplane`), and, for a cluster that runs pods, nodes with containerd and a kubelet in network
namespaces of their own, cluster DNS, storage, KubeRay and Kueue (`cluster.KubeCluster`).

`python -m forgeline_operator.dev.cluster up|down|status` brings one up and down by hand."""

from .binaries import find_binary
from .controlplane import ADMIN_TOKEN, ControlPlane

__all__ = ["ADMIN_TOKEN", "ControlPlane", "find_binary"]
