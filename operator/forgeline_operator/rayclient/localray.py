"""An embedded Ray head on this machine, with token authentication, for `forgeline run`,
the tests and the demo. Stopped (with everything it ran) when the context exits."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from .ports import free_port


class LocalRay:
    """`ray start --head` in a private temp dir; `address` is the Jobs API (dashboard) URL."""

    def __init__(
        self, num_cpus: int | None = None, temp_dir: str | None = None, token: str | None = None
    ) -> None:
        self.num_cpus = num_cpus or max(os.cpu_count() or 2, 2)
        # Ray's session directories go under temp_dir; its socket paths must stay short.
        self.temp_dir = Path(temp_dir or tempfile.mkdtemp(prefix="flray-", dir="/tmp"))
        self.token = token or secrets.token_hex(16)
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.client_port = free_port()
        # Every fixed default port (agent 52365, metrics 8080, ...) made explicit and free, so two
        # embedded heads (parallel tests, a demo beside a run) never collide.
        self.extra_ports = {
            flag: free_port()
            for flag in (
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "metrics-export-port",
                "node-manager-port",
                "object-manager-port",
                "runtime-env-agent-port",
            )
        }
        self.metrics_port = self.extra_ports["metrics-export-port"]
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self._ray = str(Path(sys.executable).parent / "ray")
        self._started = False

    @property
    def env(self) -> dict[str, str]:
        """What a Ray client needs to talk to this head."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def __enter__(self) -> LocalRay:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 90.0) -> None:
        # Jobs run `python -m forgeline_trainer`: this interpreter's bin first on PATH makes the
        # embedded head behave like a trainer image (its `python` has forgeline installed).
        bin_dir = str(Path(sys.executable).parent)
        env = {
            **os.environ,
            **self.env,
            "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        }
        cmd = [
            self._ray,
            "start",
            "--head",
            f"--port={self.gcs_port}",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--temp-dir={self.temp_dir}",
            f"--ray-client-server-port={self.client_port}",
            *(f"--{flag}={port}" for flag, port in self.extra_ports.items()),
            "--disable-usage-stats",
        ]
        # A session of its own: Ctrl-C in the terminal (SIGINT to the foreground process group)
        # must reach `forgeline run`, which stops the Ray job cleanly, not Ray's daemons.
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{proc.stdout}\n{proc.stderr}")
        self._started = True
        self._saved_env = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)  # this process's Jobs client authenticates with the token
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                req = urllib.request.Request(
                    f"{self.address}/api/version", headers={"Authorization": f"Bearer {self.token}"}
                )
                with urllib.request.urlopen(req, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"Ray dashboard at {self.address} did not come up in {timeout}s")

    def stop(self) -> None:
        """Stop this head and every process it started — and only those (`ray stop` would stop
        every Ray on the machine): each carries our private temp dir on its command line or our
        token in its environment."""
        if not self._started:
            return
        import psutil

        marker = str(self.temp_dir)
        me = psutil.Process()
        spared = {me.pid, *(p.pid for p in me.parents())}  # we carry the token too
        ours = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if proc.info["pid"] in spared:
                continue
            try:
                if (
                    any(marker in part for part in proc.info["cmdline"] or [])
                    or proc.environ().get("RAY_AUTH_TOKEN") == self.token
                ):
                    ours.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        family = {p.pid: p for p in ours}
        for p in ours:
            try:
                family.update({c.pid: c for c in p.children(recursive=True) if c.pid not in spared})
            except psutil.NoSuchProcess:
                continue
        for p in family.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(list(family.values()), timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        self._started = False
        for key, value in getattr(self, "_saved_env", {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(self.temp_dir, ignore_errors=True)
