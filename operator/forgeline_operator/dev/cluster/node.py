"""One Kubernetes node as host processes: containerd (Debian's, CRI plugin, runc, overlayfs), the
kubelet (cgroupfs driver: this machine has cgroup v1) and kube-proxy (iptables mode), in a network
namespace of its own (network.Fabric) and a private mount namespace.

The mount namespace is held by an anchor process; every node process is started inside it with
nsenter. A tmpfs over /run there keeps containerd's sockets, runc's state, the pods' network
namespaces and iptables' lock apart from this machine's and from the other nodes', and every mount
the kubelet and containerd make (pod volumes, container root filesystems) lives and dies with it:
once the node's processes are gone, nothing is left mounted. The kubelet's cgroups live under a
cgroup root of the node's own, removed at stop.

containerd's root (images and their unpacked layers) persists in $FORGELINE_CACHE/nodes/<name>, so
images imported once are there the next time; a node with no registry can never pull them back.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import yaml

from .binaries import CACHE, find_binary
from .network import NETNS_DIR, Fabric
from .pki import PKI

CONTAINERD_STATE = "/run/containerd/state"
"""containerd's state directory inside the node (its /run is the node's own tmpfs). A mount under
it in this machine's mount namespace means a containerd ran outside the node's."""
DEVICE_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
"""Where every kubelet serves its device-plugin registry (not under --root-dir)."""

CLUSTER_DNS_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
CGROUP_ROOT = Path("/sys/fs/cgroup")
SANDBOX_IMAGE_REPO = "registry.k8s.io/pause"
CNI_BIN_DIR = "/usr/lib/cni"


class _Attached:
    def __init__(self, pid: int) -> None:
        self.pid = pid


def anchor_ready(pid: int) -> bool:
    """Whether process `pid` is a node's anchor with its mounts made: it has become `sleep
    infinity`, which its shell execs only once every mount succeeded, in a mount namespace other
    than this process's. Its earlier command lines (nsenter, unshare, sh -c) contain the word
    "sleep" too: matching that word let containerd be started by `nsenter --target` while the pid
    was still nsenter or unshare, in this machine's mount namespace, where the node's later
    processes never found its socket (kubelet: "no such file or directory"; ctr: "failed to dial
    … timeout"; seen in CI twice in one run)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        theirs = os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return False
    return argv[:2] == [b"sleep", b"infinity"] and theirs != os.readlink("/proc/self/ns/mnt")


def node_token(name: str) -> str:
    return f"forgeline-node-{name}-token"


def proxy_token(name: str) -> str:
    return f"forgeline-proxy-{name}-token"


@dataclass
class NodeSpec:
    """A node's name, labels and taints (read from kind-config.yaml's nodes by dev.cluster.pools)."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[dict[str, str]] = field(default_factory=list)
    extended_resources: dict[str, str] = field(default_factory=dict)
    """Capacity advertised by patching the node's status, e.g. {"nvidia.com/gpu": "8"}."""


class Node:
    def __init__(
        self,
        spec: NodeSpec,
        index: int,
        fabric: Fabric,
        workdir: Path,
        pki: PKI,
        apiserver_url: str,
        node_count: int,
        sandbox_image: str,
    ) -> None:
        self.spec, self.index, self.fabric = spec, index, fabric
        self.name = spec.name
        self.workdir = workdir
        self.pki, self.apiserver_url = pki, apiserver_url
        self.node_count = node_count
        self.sandbox_image = sandbox_image
        self.ip = fabric.node_ip(index)
        self.netns = fabric.netns(spec.name)
        self.cgroup_root = f"/{fabric.bridge}-{spec.name}"
        self.containerd_root = CACHE / "nodes" / spec.name / "containerd"
        self.anchor: subprocess.Popen[bytes] | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    @classmethod
    def attach(cls, name: str, anchor_pid: int) -> Node:
        """A handle on a running node of another process's cluster (images, ctr): its anchor's pid."""
        node = cls.__new__(cls)
        node.name = name
        node.anchor = _Attached(anchor_pid)  # type: ignore[assignment]
        return node

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Network namespace, mount namespace, cgroups, containerd, kubelet, kube-proxy."""
        for d in ("log", "kubelet", "cni/net.d", "cni/ipam"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        self.containerd_root.mkdir(parents=True, exist_ok=True)
        self.fabric.add_node(self.index, self.name, self.node_count)
        self._start_anchor()
        self._make_cgroups()
        self._write_cni_config()
        self._spawn("containerd", [find_binary("containerd"), "--config", str(self._containerd_config())])
        self._wait_for(lambda: self._ctr_answers(), "containerd", 60)
        self._spawn("kubelet", self._kubelet_command())
        self._spawn("kube-proxy", [find_binary("kube-proxy"), f"--config={self._kube_proxy_config()}"])

    def stop(self) -> list[str]:
        """Stop everything the node started; what could not be cleaned up (empty when all went)."""
        for name in ("kube-proxy", "kubelet"):
            self._terminate(name)
        self._kill_cgroup_processes()
        if self.anchor is not None and self.anchor.poll() is None:
            self._forget_containers()
        self._terminate("containerd")
        self._kill_namespace_processes()
        if self.anchor is not None:
            self._terminate_proc(self.anchor, timeout=5)
        problems = self._remove_cgroups()
        return problems

    def alive(self) -> list[str]:
        return [name for name, proc in self._procs.items() if proc.poll() is None]

    def exited(self) -> list[str]:
        return [
            f"{name} ({proc.returncode})" for name, proc in self._procs.items() if proc.poll() is not None
        ]

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.workdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    # -- running things inside the node ----------------------------------------------------------

    def enter(self) -> list[str]:
        """argv prefix that runs a command in the node's mount and network namespaces."""
        assert self.anchor is not None, "node not started"
        return ["nsenter", f"--target={self.anchor.pid}", "--mount", "--net", "--"]

    def run(
        self, *argv: str, check: bool = True, timeout: float = 600, **kw: object
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.enter(), *argv], capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{self.name}: {' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        return proc

    def ctr(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        """containerd's own client against this node's containerd (namespace k8s.io: the CRI's)."""
        return self.run("ctr", "--address", "/run/containerd/containerd.sock", "-n", "k8s.io", *args,
                        check=check, timeout=timeout)  # fmt: skip

    def images(self) -> set[str]:
        out = self.ctr("images", "ls", "-q", check=False).stdout
        return {line.strip() for line in out.splitlines() if line.strip()}

    def snapshots(self) -> set[str]:
        """Names of the node's committed overlayfs snapshots (an unpacked layer's is its chain ID)."""
        out = self.ctr("snapshots", "--snapshotter", "overlayfs", "ls", check=False).stdout
        rows = [line.split() for line in out.splitlines()[1:]]
        return {row[0] for row in rows if row and row[-1] == "Committed"}

    def discard_content(self, digests: list[str]) -> None:
        """Delete layer blobs once unpacked (what containerd's discard_unpacked_layers does for
        pulls): the snapshots are what containers run from, and the blobs would double the disk."""
        for i in range(0, len(digests), 50):
            self.ctr("content", "rm", *digests[i : i + 50], check=False)

    def import_stream(self, write: Callable[[IO[bytes]], int], timeout: float = 1800) -> int:
        """`ctr images import -` fed by `write(stdin)` (an OCI or docker archive); the image's
        layers are unpacked for the CRI's snapshotter."""
        argv = [*self.enter(), "ctr", "--address", "/run/containerd/containerd.sock", "-n", "k8s.io",
                "images", "import", "--snapshotter", "overlayfs", "-"]  # fmt: skip
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdin is not None and proc.stdout is not None
        written = 0
        try:
            written = write(proc.stdin)
            proc.stdin.close()
        except BrokenPipeError:  # ctr stopped reading: its own output says why
            pass
        output = proc.stdout.read().decode(errors="replace")
        if proc.wait(timeout=timeout) != 0:
            raise RuntimeError(
                f"{self.name}: ctr images import failed ({proc.returncode}):\n{output[-2000:]}"
            )
        return written

    def remove_images(self, references: list[str]) -> None:
        if references:
            self.ctr("images", "rm", *references, check=False)

    # -- internals ---------------------------------------------------------------------------------

    def _start_anchor(self) -> None:
        # nsenter and unshare exec in place: the Popen's pid is the process that holds the namespaces.
        setup = " && ".join(
            [
                "mount -t tmpfs -o mode=0755 forgeline-run /run",
                "mkdir -p /run/netns /run/containerd",
                f"mount --bind {self.workdir / 'log'} /var/log",
                # the device-plugin socket's path is fixed (/var/lib/kubelet/device-plugins): a
                # node of its own, or two kubelets race to bind one socket and one exits
                f"mkdir -p {self.workdir / 'device-plugins'} {DEVICE_PLUGIN_DIR}",
                f"mount --bind {self.workdir / 'device-plugins'} {DEVICE_PLUGIN_DIR}",
                "exec sleep infinity",
            ]
        )
        self.anchor = subprocess.Popen(
            ["nsenter", f"--net={NETNS_DIR / self.netns}", "--", "unshare", "--mount", "--propagation",
             "private", "--", "/bin/sh", "-c", setup],
            start_new_session=True,
        )  # fmt: skip
        self._wait_for(self._anchor_ready, "the node's mount namespace", 10)

    def _anchor_ready(self) -> bool:
        assert self.anchor is not None
        if self.anchor.poll() is not None:
            raise RuntimeError(f"{self.name}: the namespace anchor exited ({self.anchor.returncode})")
        return anchor_ready(self.anchor.pid)

    def _mount_ns(self) -> str | None:
        if self.anchor is None:
            return None
        try:
            return os.readlink(f"/proc/{self.anchor.pid}/ns/mnt")
        except OSError:
            return None

    def _subsystems(self) -> list[Path]:
        return sorted(p for p in CGROUP_ROOT.iterdir() if p.is_dir() and (p / "cgroup.procs").exists())

    def _make_cgroups(self) -> None:
        """The kubelet's cgroup root must exist in every hierarchy before it starts."""
        for subsystem in self._subsystems():
            path = subsystem / self.cgroup_root.lstrip("/")
            path.mkdir(exist_ok=True)
            if subsystem.name == "cpuset":
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (path / f).write_text((subsystem / f).read_text())

    def _cgroup_dirs(self) -> list[Path]:
        dirs = []
        for subsystem in self._subsystems():
            top = subsystem / self.cgroup_root.lstrip("/")
            if top.is_dir():
                dirs += [Path(d) for d, _, _ in os.walk(top)]
        return dirs

    def _kill_cgroup_processes(self) -> None:
        for _ in range(3):
            pids = set()
            for d in self._cgroup_dirs():
                with contextlib.suppress(OSError):
                    pids |= {int(p) for p in (d / "cgroup.procs").read_text().split()}
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)

    def _remove_cgroups(self) -> list[str]:
        problems = []
        for d in sorted(self._cgroup_dirs(), key=lambda p: len(p.parts), reverse=True):
            for attempt in range(20):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if attempt == 19:
                        problems.append(f"cgroup {d}: {exc}")
                    time.sleep(0.1)
        return problems

    def _forget_containers(self) -> None:
        """Delete the containers' records (their processes are already killed), so the next start
        of this node's persistent containerd root begins with images only."""
        for kind in ("containers",):
            ids = self.ctr(kind, "ls", "-q", check=False).stdout.split()
            if ids:
                self.ctr("tasks", "rm", "-f", *ids, check=False, timeout=60)
                self.ctr(kind, "rm", *ids, check=False, timeout=120)

    def _kill_namespace_processes(self) -> None:
        """Every process left in the node's mount namespace (containerd's shims, mostly)."""
        ns = self._mount_ns()
        if ns is None:
            return
        anchor = self.anchor.pid if self.anchor else -1
        for sig in (signal.SIGTERM, signal.SIGKILL):
            found = False
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit() or int(proc.name) == anchor:
                    continue
                try:
                    if os.readlink(proc / "ns" / "mnt") == ns:
                        os.kill(int(proc.name), sig)
                        found = True
                except OSError:
                    continue
            if not found:
                return
            time.sleep(1.0)

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.workdir / f"{name}.log", "ab") as log:
            self._procs[name] = subprocess.Popen(
                [*self.enter(), *argv], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _terminate(self, name: str) -> None:
        proc = self._procs.get(name)
        if proc is not None:
            self._terminate_proc(proc)

    @staticmethod
    def _terminate_proc(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def _ctr_answers(self) -> bool:
        try:  # a probe that hangs must not eat the whole wait (seen: 'not ready after 30s' twice)
            proc = self.ctr("version", check=False, timeout=10)
        except subprocess.TimeoutExpired:
            self._last_probe = "ctr version did not answer within 10 s"
            return False
        self._last_probe = (proc.stderr or proc.stdout or "").strip()[-500:]
        return proc.returncode == 0

    def _wait_for(self, ready: object, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():  # type: ignore[operator]
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name}: {name} exited ({proc.returncode}):\n{self.log_tail(name)}"
                    )
            if time.monotonic() > deadline:
                last = getattr(self, "_last_probe", "")
                raise TimeoutError(
                    f"{self.name}: {what} not ready after {timeout}s{': ' + last if last else ''}"
                )
            time.sleep(0.2)

    # -- configuration ---------------------------------------------------------------------------

    def _containerd_config(self) -> Path:
        root = self.containerd_root
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        text = f"""version = 2
root = "{root}"
state = "{CONTAINERD_STATE}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"

[{cri}]
  sandbox_image = "{self.sandbox_image}"
  disable_apparmor = true
  # This machine lets no process lower its OOM score below its own (no CAP_SYS_RESOURCE over it):
  # the kubelet asks -998 for sandboxes, so keep it at least ours, as kind does when rootless.
  restrict_oom_score_adj = true
  enable_cdi = false
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{self.workdir / "cni" / "net.d"}"
"""
        path = self.workdir / "containerd.toml"
        path.write_text(text)
        return path

    def _write_cni_config(self) -> None:
        """containerd's own example network: a bridge with host-local addresses, plus portmap.
        No masquerading: every pod range is routed (network.Fabric), so pods see each other's IPs."""
        conf = {
            "cniVersion": "1.0.0",
            "name": "forgeline",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": self.fabric.pod_cidr(self.index)}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.workdir / "cni" / "ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        import json

        (self.workdir / "cni" / "net.d" / "10-forgeline.conflist").write_text(json.dumps(conf, indent=2))

    def _kubeconfig(self, name: str, token: str) -> Path:
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "c",
                    "cluster": {"server": self.apiserver_url, "certificate-authority": str(self.pki.ca.cert)},
                }
            ],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "c",
        }
        path = self.workdir / f"{name}.kubeconfig"
        path.write_text(yaml.safe_dump(cfg))
        path.chmod(0o600)
        return path

    def _kubelet_command(self) -> list[str]:
        serving = self.pki.serving(f"kubelet-{self.name}", f"system:node:{self.name}", [self.ip], [self.name])
        resolv = self.workdir / "resolv.conf"
        # Pods with dnsPolicy Default (CoreDNS itself) get no upstream: names outside the cluster
        # don't resolve, and nothing leaves the test network.
        resolv.write_text("options ndots:1\n")
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.ip,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 10248,
            "tlsCertFile": str(serving.cert),
            "tlsPrivateKeyFile": str(serving.key),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.pki.ca.cert)},
            },
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "cgroupsPerQOS": True,
            "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
            "clusterDNS": [CLUSTER_DNS_IP],
            "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": str(resolv),
            # As kind does for a throwaway node: never collect images (none can be pulled back
            # here) and never evict for disk pressure.
            "imageGCHighThresholdPercent": 100,
            "evictionHard": {"nodefs.available": "0%", "nodefs.inodesFree": "0%", "imagefs.available": "0%"},
            "failSwapOn": False,
            "failCgroupV1": False,
            "serializeImagePulls": False,
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
            "shutdownGracePeriod": "0s",
            "containerLogMaxSize": "10Mi",
            "nodeStatusUpdateFrequency": "5s",
            # No CFS quota: two nodes share this machine's 2 cores, and every Ray process of a job
            # imports torch as it starts. A pod capped at its half-CPU limit imported at half a core
            # while the other cores stood idle (54 s from submission to the first step). Requests
            # still weight the CPU shares and the scheduler; an idle core goes to whoever needs it,
            # as on the many production clusters that turn CFS quotas off.
            "cpuCFSQuota": False,
        }
        path = self.workdir / "kubelet.yaml"
        path.write_text(yaml.safe_dump(config))
        argv = [
            find_binary("kubelet"),
            f"--config={path}",
            f"--kubeconfig={self._kubeconfig('kubelet', node_token(self.name))}",
            f"--root-dir={self.workdir / 'kubelet'}",
            f"--cert-dir={self.workdir / 'kubelet' / 'pki'}",
            f"--hostname-override={self.name}",
            f"--node-ip={self.ip}",
            "--v=1",
        ]
        if self.spec.labels:
            argv.append("--node-labels=" + ",".join(f"{k}={v}" for k, v in sorted(self.spec.labels.items())))
        if self.spec.taints:
            taints = [f"{t['key']}={t.get('value', '')}:{t['effect']}" for t in self.spec.taints]
            argv.append("--register-with-taints=" + ",".join(taints))
        return argv

    def _kube_proxy_config(self) -> Path:
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self._kubeconfig("kube-proxy", proxy_token(self.name)))},
            "hostnameOverride": self.name,
            "bindAddress": self.ip,
            "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            "mode": "iptables",
            "clusterCIDR": self.fabric.cluster_cidr,
            # As kind: leave the machine-wide conntrack table size alone.
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
            "iptables": {"minSyncPeriod": "1s", "syncPeriod": "30s"},
            "nodePortAddresses": ["primary"],
        }
        path = self.workdir / "kube-proxy.yaml"
        path.write_text(yaml.safe_dump(config))
        return path
