"""The test cluster's nodes, read from kind-config.yaml (the one description of the node pools): one
node per `worker`, with its labels and the taints of its kubeadm JoinConfiguration patch. A node
labelled `nvidia.com/gpu.present: "true"` advertises `nvidia.com/gpu.count` GPUs."""

from __future__ import annotations

from pathlib import Path

import yaml

from .node import NodeSpec

GPU_RESOURCE = "nvidia.com/gpu"


def node_specs(kind_config: Path) -> list[NodeSpec]:
    config = yaml.safe_load(kind_config.read_text())
    cluster = config.get("name", "kind")
    specs: list[NodeSpec] = []
    workers = [n for n in config.get("nodes", []) if n.get("role") == "worker"]
    for i, node in enumerate(workers):
        labels = {str(k): str(v) for k, v in (node.get("labels") or {}).items()}
        taints: list[dict[str, str]] = []
        for patch in node.get("kubeadmConfigPatches") or []:
            doc = yaml.safe_load(patch)
            if doc.get("kind") == "JoinConfiguration":
                taints += doc.get("nodeRegistration", {}).get("taints") or []
        pool = labels.get("forgeline.dev/pool")
        name = f"{cluster}-{pool}" if pool else f"{cluster}-worker{i or ''}"
        extended = {}
        if labels.get("nvidia.com/gpu.present") == "true":
            extended[GPU_RESOURCE] = labels.get("nvidia.com/gpu.count", "1")
        specs.append(NodeSpec(name=name, labels=labels, taints=taints, extended_resources=extended))
    if not specs:
        raise ValueError(f"{kind_config} has no worker nodes")
    return specs
