"""The test cluster's network: a bridge on this machine that the control plane listens on, and one
network namespace per node joined to it by a veth pair. Pod and Service traffic stays inside these
namespaces and the bridge; nothing is sent to any other address.

    host: bridge flk<N> 10.250.<N>.1/24   (kube-apiserver, KubeRay, Kueue, Prometheus listen here)
      ├── veth ── netns flk<N>-<node 0>: eth0 10.250.<N>.10, pods 10.<160+N>.0.0/24 on cni0
      └── veth ── netns flk<N>-<node 1>: eth0 10.250.<N>.11, pods 10.<160+N>.1.0/24 on cni0

N is the first index whose bridge does not exist yet, so two clusters (a developer's and a test
run's) can live side by side. Each node routes the other nodes' pod ranges to them; the host routes
every pod range to its node (the apiserver reaches webhooks and pods, Prometheus scrapes pods).
Service ClusterIPs exist only as kube-proxy's iptables rules inside each node's namespace.
Everything here disappears with `destroy()`: the namespaces take their veths, rules and routes.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

NETNS_DIR = Path("/run/netns")
MAX_CLUSTERS = 64
POD_MTU = 1500


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def in_netns(netns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """A command in a node's network namespace only (mounts stay this machine's)."""
    return run("nsenter", f"--net={NETNS_DIR / netns}", "--", *argv, check=check)


def _links() -> set[str]:
    out = run("ip", "-o", "link", "show").stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


@dataclass
class Fabric:
    index: int

    @classmethod
    def allocate(cls) -> Fabric:
        """The first free index (no bridge of that name, no namespace of that prefix)."""
        links = _links()
        taken = {p.name for p in NETNS_DIR.glob("flk*")} if NETNS_DIR.exists() else set()
        for i in range(MAX_CLUSTERS):
            if f"flk{i}" not in links and not any(t.startswith(f"flk{i}-") for t in taken):
                return cls(i)
        raise RuntimeError(f"all {MAX_CLUSTERS} test cluster networks are in use (ip link show | grep flk)")

    @property
    def bridge(self) -> str:
        return f"flk{self.index}"

    @property
    def host_ip(self) -> str:
        return f"10.250.{self.index}.1"

    def node_ip(self, node: int) -> str:
        return f"10.250.{self.index}.{10 + node}"

    def pod_cidr(self, node: int) -> str:
        return f"10.{160 + self.index}.{node}.0/24"

    @property
    def cluster_cidr(self) -> str:
        return f"10.{160 + self.index}.0.0/16"

    def netns(self, node_name: str) -> str:
        return f"{self.bridge}-{node_name}"[:48]

    def host_veth(self, node: int) -> str:
        return f"{self.bridge}n{node}"

    def create(self) -> None:
        run("ip", "link", "add", self.bridge, "type", "bridge")
        run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")

    def add_node(self, node: int, name: str, all_nodes: int) -> str:
        """The node's network namespace, wired to the bridge; returns its name."""
        ns, veth = self.netns(name), self.host_veth(node)
        run("ip", "netns", "add", ns)
        run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        run("ip", "link", "set", veth, "master", self.bridge, "up")
        in_netns(ns, "ip", "link", "set", "lo", "up")
        in_netns(ns, "ip", "addr", "add", f"{self.node_ip(node)}/24", "dev", "eth0")
        in_netns(ns, "ip", "link", "set", "eth0", "up")
        # The node routes pod traffic (cni0 <-> eth0); kube-proxy's rules live in this namespace.
        in_netns(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        in_netns(ns, "sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1")
        for other in range(all_nodes):
            if other != node:
                in_netns(ns, "ip", "route", "add", self.pod_cidr(other), "via", self.node_ip(other))
        run("ip", "route", "add", self.pod_cidr(node), "via", self.node_ip(node), "dev", self.bridge)
        return ns

    def destroy(self, node_names: list[str]) -> list[str]:
        """Delete the namespaces and the bridge (their veths and routes go with them); what failed."""
        problems = []
        for name in node_names:
            ns = self.netns(name)
            if (NETNS_DIR / ns).exists():
                proc = run("ip", "netns", "del", ns, check=False)
                if proc.returncode != 0:
                    problems.append(f"ip netns del {ns}: {proc.stderr.strip()}")
        if self.bridge in _links():
            proc = run("ip", "link", "del", self.bridge, check=False)
            if proc.returncode != 0:
                problems.append(f"ip link del {self.bridge}: {proc.stderr.strip()}")
        return problems

    def leftovers(self) -> list[str]:
        """What of this fabric still exists (empty after destroy())."""
        found = [f"bridge {self.bridge}"] if self.bridge in _links() else []
        if NETNS_DIR.exists():
            found += [f"netns {p.name}" for p in NETNS_DIR.glob(f"{self.bridge}-*")]
        return found
