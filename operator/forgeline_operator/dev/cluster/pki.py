"""The test cluster's certificates, made with openssl: one CA, the apiserver's serving certificate
(its Service IP and DNS names included, so pods reach it through the `kubernetes` Service and verify
it with the ServiceAccount's ca.crt), and client certificates (the apiserver's to the kubelets).
As hack/local-up-cluster.sh does, with openssl instead of cfssl."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


class PKI:
    """Certificates under `directory` (made on first use, kept for the cluster's life)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = CertPair(self.dir / "ca.crt", self.dir / "ca.key")
        if not self.ca.cert.exists():
            _openssl(
                "req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-days", "3650",
                "-keyout", self.ca.key.name, "-out", self.ca.cert.name,
                "-subj", "/CN=forgeline-test-ca", cwd=self.dir,
            )  # fmt: skip

    def serving(self, name: str, common_name: str, ips: list[str], dns: list[str]) -> CertPair:
        """A server certificate for the given IP and DNS subject alternative names."""
        sans = [f"IP:{ip}" for ip in ips] + [f"DNS:{d}" for d in dns]
        return self._issue(name, f"/CN={common_name}", "serverAuth", sans)

    def client(self, name: str, common_name: str, organizations: tuple[str, ...] = ()) -> CertPair:
        """A client certificate: Kubernetes reads the user from CN and the groups from O."""
        subject = "".join(f"/O={o}" for o in organizations) + f"/CN={common_name}"
        return self._issue(name, subject, "clientAuth", [])

    def _issue(self, name: str, subject: str, usage: str, sans: list[str]) -> CertPair:
        pair = CertPair(self.dir / f"{name}.crt", self.dir / f"{name}.key")
        if pair.cert.exists():
            return pair
        ext = self.dir / f"{name}.ext"
        lines = ["basicConstraints=CA:FALSE", "keyUsage=digitalSignature,keyEncipherment"]
        lines.append(f"extendedKeyUsage={usage}")
        if sans:
            lines.append("subjectAltName=" + ",".join(sans))
        ext.write_text("\n".join(lines) + "\n")
        csr = self.dir / f"{name}.csr"
        _openssl(
            "req", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", pair.key.name,
            "-out", csr.name, "-subj", subject, cwd=self.dir,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", csr.name, "-CA", self.ca.cert.name, "-CAkey", self.ca.key.name,
            "-CAcreateserial", "-days", "3650", "-extfile", ext.name, "-out", pair.cert.name, cwd=self.dir,
        )  # fmt: skip
        return pair
