"""The operator as a child process (`python -m forgeline_operator`), ready once /healthz answers:
what `make demo`, the end-to-end tests and the scale bench start."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..rayclient.ports import free_port


class OperatorProcess:
    """One operator with its own FORGELINE_* settings (given as keyword arguments, e.g.
    FORGELINE_BACKEND="local"), its own metrics and health ports, and a log file; restartable."""

    def __init__(self, kubeconfig: Path, workdir: Path, log_path: Path, **settings: str) -> None:
        self.kubeconfig, self.workdir, self.log_path = kubeconfig, workdir, log_path
        self.metrics_port, self.health_port = free_port(), free_port()
        self.env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "PYTHONUNBUFFERED": "1",
            "FORGELINE_METRICS_PORT": str(self.metrics_port),
            "FORGELINE_HEALTH_PORT": str(self.health_port),
            **settings,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout: float = 120.0) -> None:
        """Start it and wait until its health endpoint answers; RuntimeError with the log's tail
        if it exits or does not answer within `timeout` seconds."""
        with open(self.log_path, "ab") as log:  # the child keeps its own handle
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "forgeline_operator"],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the operator did not start:\n{self.log_tail()}") from None
                time.sleep(0.3)

    def stop(self, kill: bool = False, timeout: float = 60.0) -> None:
        """Terminate (or kill) it and wait; killed if it has not exited within `timeout`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        (self.proc.kill if kill else self.proc.terminate)()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            return response.read().decode()
