"""The end-to-end tests' cluster: one KubeCluster per session (forgeline_operator.dev.cluster) with
the operator and trainer images built from the repository's Dockerfiles and loaded into its nodes,
Kueue, and Forgeline's chart installed with `helm install` (the operator runs as a pod).

Each test works in a namespace of its own with a `work` PersistentVolumeClaim bound to a directory
of this machine (`volume(ns)`), so `pvc://work/...` URIs are real mounts in the Ray pods."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from forgeline_operator.dev.cluster import binaries
from forgeline_operator.dev.cluster.cluster import KubeCluster

PLURAL = {"TrainingJob": "trainingjobs.forgeline.dev", "FineTuneJob": "finetunejobs.forgeline.dev"}
TERMINAL = ("Succeeded", "Failed")


def ts(value: str | None) -> float | None:
    """An RFC 3339 timestamp from the apiserver or our status, as epoch seconds."""
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@dataclass
class KubeEnv:
    cluster: KubeCluster
    images: dict[str, str]
    volumes: Path
    full_volume: Path | None = None
    """A 1 MiB tmpfs every node sees (tests/conftest.py): a checkpoint volume that fills up."""
    namespaces: list[str] = field(default_factory=list)

    def kubectl(self, *args: str, **kw: Any) -> Any:
        return self.cluster.kubectl(*args, **kw)

    def get(self, *args: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    # -- namespaces and volumes ----------------------------------------------------------------

    def namespace(self, prefix: str, labels: dict[str, str] | None = None, volume: Path | None = None) -> str:
        """A fresh namespace (Pod Security `restricted` enforced: the Ray pods must meet it) with a
        10Gi `work` claim bound to a directory of this machine, owned by the Ray pods' user."""
        ns = f"{prefix}-{uuid.uuid4().hex[:6]}"
        meta = {"name": ns, "labels": {"pod-security.kubernetes.io/enforce": "restricted", **(labels or {})}}
        self.cluster.apply_objects([{"apiVersion": "v1", "kind": "Namespace", "metadata": meta}])
        self.namespaces.append(ns)
        self.cluster.work_volume(ns, volume or self.volume(ns))
        return ns

    def volume(self, ns: str) -> Path:
        return self.volumes / ns

    # -- jobs ------------------------------------------------------------------------------------

    def apply(self, docs: list[dict[str, Any]], ns: str) -> None:
        self.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump_all(docs))

    def job(self, kind: str, name: str, ns: str) -> dict[str, Any]:
        return self.get(PLURAL[kind], name, "-n", ns)

    def wait_for(
        self,
        kind: str,
        name: str,
        ns: str,
        done: Callable[[dict[str, Any]], bool],
        timeout: float,
        every: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Poll the job until `done(status)`; on timeout, an AssertionError with its status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.job(kind, name, ns).get("status", {})
            if done(status):
                return status
            if every is not None:
                every()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{kind} {ns}/{name} not done after {timeout:.0f}s: {json.dumps(status)[:3000]}"
                )
            time.sleep(2)

    def wait_terminal(self, kind: str, name: str, ns: str, timeout: float, **kw: Any) -> dict[str, Any]:
        return self.wait_for(kind, name, ns, lambda s: s.get("phase") in TERMINAL, timeout, **kw)

    def pods(self, ns: str, selector: str = "") -> list[dict[str, Any]]:
        return self.get("pods", "-n", ns, *(["-l", selector] if selector else []))["items"]


class Watch:
    """Every version of the objects a `kubectl get --watch` selects, as the apiserver sent them
    (with the time each arrived): a status the operator held for a second is never missed, as
    polling under load could miss it (CI: a 12-second training run's live progress).

        with Watch(kube, "trainingjobs.forgeline.dev", "-n", ns, name) as versions: ...
    """

    def __init__(self, env: KubeEnv, *args: str) -> None:
        kubectl = binaries.find_binary("kubectl")
        self.argv = [
            kubectl,
            "--kubeconfig",
            str(env.cluster.kubeconfig),
            "get",
            *args,
            "--watch",
            "-o",
            "json",
        ]
        self.versions: list[tuple[float, dict[str, Any]]] = []
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> list[tuple[float, dict[str, Any]]]:
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self.versions

    def _run(self) -> None:
        """One `kubectl get --watch` after another: a watch ends when the apiserver restarts."""
        while not self._stopped.is_set():
            self._proc = subprocess.Popen(
                self.argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
            self._read(self._proc)
            self._proc.wait()
            self._stopped.wait(1)

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        decoder, buf = json.JSONDecoder(), ""
        for line in proc.stdout:
            buf += line
            while buf.strip():
                try:
                    obj, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break  # half an object: read on
                self.versions.append((time.time(), obj))
                buf = buf.lstrip()[end:]

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)


class PodWatch:
    """What the Ray pods of a namespace went through, sampled while a job runs (pods are deleted
    when the job succeeds): node, scheduling, container start and readiness times."""

    def __init__(self, env: KubeEnv, ns: str) -> None:
        self.env, self.ns = env, ns
        self.seen: dict[str, dict[str, Any]] = {}

    def __call__(self) -> None:
        for pod in self.env.pods(self.ns, "app.kubernetes.io/managed-by=forgeline"):
            self.seen[pod["metadata"]["name"]] = pod

    def phases(self) -> dict[str, Any]:
        """Per pod: created → scheduled → container started → Ready (seconds from creation)."""
        out = {}
        for name, pod in self.seen.items():
            created = ts(pod["metadata"]["creationTimestamp"])
            conds = {c["type"]: ts(c.get("lastTransitionTime")) for c in pod["status"].get("conditions", [])}
            started = [
                ts(s["state"]["running"]["startedAt"])
                for s in pod["status"].get("containerStatuses", [])
                if "running" in s.get("state", {})
            ]
            out[name] = {
                "node": pod["spec"].get("nodeName"),
                "role": pod["metadata"]["labels"].get("ray.io/node-type"),
                "scheduled_s": _since(created, conds.get("PodScheduled")),
                "init_done_s": _since(created, conds.get("Initialized")),
                "started_s": _since(created, min(started) if started else None),
                "ready_s": _since(
                    created, conds.get("Ready") if pod["status"].get("phase") == "Running" else None
                ),
            }
        return out


def _since(start: float | None, end: float | None) -> float | None:
    return round(end - start, 1) if start is not None and end is not None else None
