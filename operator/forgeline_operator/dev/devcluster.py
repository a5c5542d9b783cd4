"""A real Kubernetes control plane on loopback (etcd + kube-apiserver) for tests and the demo.

No kubelet, scheduler or controller-manager: objects are stored and validated for real (CRD
schemas, defaulting, RBAC, admission), but no pod ever runs. That is what the operator's own logic
needs; the Ray work runs on an embedded local Ray instead.

Binaries, in order of preference:
1. `$KUBEBUILDER_ASSETS/{etcd,kube-apiserver}` (controller-runtime's envtest binaries);
2. `$FORGELINE_CACHE/bin/kube-apiserver` (built by tests/setup/build_kube_apiserver.sh) and the
   `etcd` on PATH (Debian's etcd-server).

Authentication is a static token file (an admin in system:masters, plus any extra users you
add); authorization is RBAC, so tests can check permissions for real.
"""

from __future__ import annotations

import os
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

from ..rayclient.ports import free_port

CACHE = Path(os.environ.get("FORGELINE_CACHE", Path.home() / ".cache" / "forgeline"))
ADMIN_TOKEN = "forgeline-admin-token"


def find_binary(name: str) -> str:
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    candidates = [Path(assets) / name] if assets else []
    candidates.append(CACHE / "bin" / name)
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(
        f"{name} not found (looked in KUBEBUILDER_ASSETS, {CACHE / 'bin'} and PATH); "
        "run `make tools` (tests/setup/*.sh) or set KUBEBUILDER_ASSETS to envtest binaries"
    )


@dataclass
class ControlPlane:
    """Start with `start()` (or use as a context manager); `kubeconfig` is then ready to use."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="forgeline-cp-")))
    extra_tokens: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    """token → (user name, groups), e.g. a ServiceAccount-like user for RBAC tests."""

    def __post_init__(self) -> None:
        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.kubeconfig = self.workdir / "kubeconfig"
        self._procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 90.0) -> None:
        wd = self.workdir
        (wd / "etcd").mkdir(parents=True, exist_ok=True)
        (wd / "certs").mkdir(exist_ok=True)
        self._write_tokens()
        self._write_sa_keys()
        self._spawn("etcd", self._etcd_command())
        self._spawn("kube-apiserver", self._apiserver_command())
        self._wait_ready(timeout)
        self._write_kubeconfig()

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
        ]

    def _apiserver_command(self) -> list[str]:
        wd = self.workdir
        return [
            find_binary("kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--cert-dir={wd / 'certs'}",
            f"--token-auth-file={wd / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={wd / 'sa.pub'}",
            f"--service-account-signing-key-file={wd / 'sa.key'}",
            "--allow-privileged=true",
            "--enable-priority-and-fairness=false",
            "--disable-admission-plugins=ServiceAccount",
            "--max-requests-inflight=1000",
            "--max-mutating-requests-inflight=500",
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
        """A kubeconfig that authenticates with another static token (RBAC tests)."""
        cfg = self._kubeconfig_dict(token)
        path.write_text(yaml.safe_dump(cfg))
        return path

    # -- internals ---------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        self._procs.append(
            subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )

    def _write_tokens(self) -> None:
        rows = [f'{ADMIN_TOKEN},forgeline-admin,forgeline-admin,"system:masters"']
        for token, (user, groups) in self.extra_tokens.items():
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

    def _wait_ready(self, timeout: float) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
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
                    "cluster": {
                        "server": self.url,
                        "certificate-authority": str(self.workdir / "certs" / "apiserver.crt"),
                    },
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
