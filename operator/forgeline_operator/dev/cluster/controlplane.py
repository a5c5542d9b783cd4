"""A real Kubernetes control plane as host processes: etcd + kube-apiserver, and (for a cluster with
nodes) kube-controller-manager + kube-scheduler. Flags follow hack/local-up-cluster.sh.

Alone (`controllers=False`, the default) it serves the tests that need objects stored and validated
for real (CRD schemas with their CEL rules, defaulting, RBAC, admission) but no pod to run: the Ray
work then runs on an embedded local Ray. With nodes (dev.cluster.KubeCluster) the controllers run
too, pods get ServiceAccount tokens, and kubelets register.

Authentication: a static token file (an admin in system:masters, the controllers' and nodes' own
identities, plus any extra users a test adds) and client certificates from the cluster's CA;
authorization is Node + RBAC, so tests check permissions for real.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ...rayclient.ports import free_port
from .binaries import find_binary
from .pki import PKI

ADMIN_TOKEN = "forgeline-admin-token"
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
"""The `kubernetes` Service's ClusterIP (the first address of SERVICE_CIDR)."""
CONTROLLER_MANAGER_TOKEN = "forgeline-kcm-token"
SCHEDULER_TOKEN = "forgeline-scheduler-token"


@dataclass
class ControlPlane:
    """Start with `start()` (or use as a context manager); `kubeconfig` is then ready to use."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="forgeline-cp-")))
    extra_tokens: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    """token → (user name, groups), e.g. a ServiceAccount-like user for RBAC tests, or a node's."""
    bind_address: str = "127.0.0.1"
    """Where the apiserver listens and what it advertises (a cluster with nodes: the fabric's host IP)."""
    controllers: bool = False
    """Also run kube-controller-manager and kube-scheduler (needed as soon as pods should run)."""

    def __post_init__(self) -> None:
        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        self.port = free_port()
        self.url = f"https://{self.bind_address}:{self.port}"
        self.kubeconfig = self.workdir / "kubeconfig"
        self.pki = PKI(self.workdir / "pki")
        self._procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def ca_cert(self) -> Path:
        return self.pki.ca.cert

    def start(self, timeout: float = 90.0) -> None:
        wd = self.workdir
        (wd / "etcd").mkdir(parents=True, exist_ok=True)
        self._write_tokens()
        self._write_sa_keys()
        self._serving = self.pki.serving(
            "apiserver",
            "kube-apiserver",
            ips=sorted({"127.0.0.1", self.bind_address, KUBERNETES_SERVICE_IP}),
            dns=[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
        )
        self._kubelet_client = self.pki.client(
            "apiserver-kubelet-client", "kube-apiserver", ("system:masters",)
        )
        self._spawn("etcd", self._etcd_command())
        self._spawn("kube-apiserver", self._apiserver_command())
        self._wait_ready(timeout)
        self._write_kubeconfig()
        if self.controllers:
            self._spawn("kube-controller-manager", self._controller_manager_command())
            self._spawn("kube-scheduler", self._scheduler_command())

    def _etcd_command(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        client = f"http://127.0.0.1:{self.etcd_port}"
        return [
            find_binary("etcd"),
            "--data-dir",
            str(self.workdir / "etcd"),
            "--name",
            "forgeline-test",
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"forgeline-test={peer}",
            "--unsafe-no-fsync",
            "--quota-backend-bytes",
            str(2 * 1024**3),
            "--log-level",
            "warn",
        ]

    def _apiserver_command(self) -> list[str]:
        wd = self.workdir
        argv = [
            find_binary("kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            f"--bind-address={self.bind_address}",
            f"--advertise-address={self.bind_address}",
            f"--secure-port={self.port}",
            f"--tls-cert-file={self._serving.cert}",
            f"--tls-private-key-file={self._serving.key}",
            f"--client-ca-file={self.pki.ca.cert}",
            f"--token-auth-file={wd / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={wd / 'sa.pub'}",
            f"--service-account-signing-key-file={wd / 'sa.key'}",
            f"--kubelet-client-certificate={self._kubelet_client.cert}",
            f"--kubelet-client-key={self._kubelet_client.key}",
            # Reach kubelets by the node IP (their names resolve nowhere: the test nodes are in no DNS).
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            "--allow-privileged=true",
            "--enable-priority-and-fairness=false",
            "--max-requests-inflight=1000",
            "--max-mutating-requests-inflight=500",
        ]
        if self.controllers:
            argv.append("--enable-admission-plugins=NodeRestriction")
        else:
            # No controller-manager creates the `default` ServiceAccount, so the admission plugin
            # that requires it would reject every pod; nothing runs pods here anyway.
            argv.append("--disable-admission-plugins=ServiceAccount")
        return argv

    def _controller_manager_command(self) -> list[str]:
        wd = self.workdir
        kubeconfig = self.kubeconfig_for(CONTROLLER_MANAGER_TOKEN, wd / "kube-controller-manager.kubeconfig")
        return [
            find_binary("kube-controller-manager"),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}",
            f"--service-account-private-key-file={wd / 'sa.key'}",
            f"--root-ca-file={self.pki.ca.cert}",
            f"--cluster-signing-cert-file={self.pki.ca.cert}",
            f"--cluster-signing-key-file={self.pki.ca.key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--use-service-account-credentials=true",
            "--leader-elect=false",
            "--controllers=*,-nodeipam",
        ]

    def _scheduler_command(self) -> list[str]:
        kubeconfig = self.kubeconfig_for(SCHEDULER_TOKEN, self.workdir / "kube-scheduler.kubeconfig")
        return [
            find_binary("kube-scheduler"),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}",
            "--leader-elect=false",
        ]

    def stop(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        self._procs.clear()
        shutil.rmtree(self.workdir / "etcd", ignore_errors=True)

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.poll() is None]

    def restart_apiserver(self, down_seconds: float = 0.0, timeout: float = 90.0) -> float:
        """Stop the kube-apiserver (etcd and its data stay), wait `down_seconds`, start it again
        on the same port; the seconds it was unavailable."""
        started = time.monotonic()
        old = next(p for p in self._procs if Path(str(p.args[0])).name == "kube-apiserver")  # type: ignore[index]
        old.terminate()
        try:
            old.wait(timeout=5)
        except subprocess.TimeoutExpired:  # open watches hold a graceful shutdown up: crash it
            old.kill()
            old.wait(timeout=10)
        self._procs.remove(old)
        time.sleep(down_seconds)
        self._spawn("kube-apiserver", self._apiserver_command())
        self._wait_ready(timeout)
        return time.monotonic() - started

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.workdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def kubeconfig_for(self, token: str, path: Path) -> Path:
        """A kubeconfig that authenticates with another static token (RBAC tests, components)."""
        cfg = self._kubeconfig_dict(token)
        path.write_text(yaml.safe_dump(cfg))
        path.chmod(0o600)
        return path

    def exited(self) -> list[str]:
        """Names and exit codes of the components that are no longer running."""
        return [f"{Path(str(p.args[0])).name} ({p.returncode})" for p in self._procs if p.poll() is not None]  # type: ignore[index]

    # -- internals ---------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        self._procs.append(
            subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )

    def _write_tokens(self) -> None:
        rows = [f'{ADMIN_TOKEN},forgeline-admin,forgeline-admin,"system:masters"']
        tokens = {
            CONTROLLER_MANAGER_TOKEN: ("system:kube-controller-manager", []),
            SCHEDULER_TOKEN: ("system:kube-scheduler", []),
            **self.extra_tokens,
        }
        for token, (user, groups) in tokens.items():
            rows.append(f'{token},{user},{user},"{",".join(groups)}"')
        (self.workdir / "tokens.csv").write_text("\n".join(rows) + "\n")

    def _write_sa_keys(self) -> None:
        key, pub = self.workdir / "sa.key", self.workdir / "sa.pub"
        if not key.exists():
            subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
            subprocess.run(
                ["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)],
                check=True,
                capture_output=True,
            )

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.pki.ca.cert))

    def _wait_ready(self, timeout: float) -> None:
        ctx = self.ssl_context()
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    name = Path(proc.args[0]).name  # type: ignore[index]
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            req = urllib.request.Request(
                f"{self.url}/readyz", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
            )
            try:
                with urllib.request.urlopen(req, context=ctx, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(
            f"kube-apiserver not ready after {timeout}s ({last}):\n{self.log_tail('kube-apiserver')}"
        )

    def _kubeconfig_dict(self, token: str) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "forgeline-test",
                    "cluster": {"server": self.url, "certificate-authority": str(self.pki.ca.cert)},
                }
            ],
            "users": [{"name": "user", "user": {"token": token}}],
            "contexts": [
                {"name": "forgeline-test", "context": {"cluster": "forgeline-test", "user": "user"}}
            ],
            "current-context": "forgeline-test",
        }

    def _write_kubeconfig(self) -> None:
        self.kubeconfig.write_text(yaml.safe_dump(self._kubeconfig_dict(ADMIN_TOKEN)))
        self.kubeconfig.chmod(0o600)
