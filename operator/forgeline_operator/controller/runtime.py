"""The operator's shared state: one object, handed to every handler as kopf's memo.

`python -m forgeline_operator` builds it from the settings and passes it to `kopf.run(memo=...)`;
the startup handler connects it (Kubernetes client, the Ray backend, the metrics endpoint).
kopf gives each resource a shallow copy of the operator's memo (kopf docs/memos.rst); this one's
copy is itself, so every handler sees the same index, cursors and backend.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

from ..api import Job
from ..rayclient.localray import LocalRay
from ..rayclient.rayjobs import LogCursor, RayJobs
from . import metrics
from .backends import AddressBackend, Backend, KubeRayBackend, LocalBackend
from .jobindex import JobIndex
from .settings import OperatorSettings

log = logging.getLogger("forgeline")
_RAY_CLIENTS_KEPT = 1024


class Runtime:
    """Settings, the Ray backend, the job index and the Ray log cursors of running jobs."""

    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        self.index = JobIndex()
        self.cursors: dict[str, LogCursor] = {}
        """Ray submission id → how far its log has been read (progress records)."""
        self.api_client: Any = None
        self.local_ray: LocalRay | None = None
        self._backend: Backend | None = None
        self._ray_clients: dict[tuple[str, str | None, str | None], RayJobs] = {}
        self._ray_clients_lock = threading.Lock()

    def __copy__(self) -> Runtime:
        return self  # kopf copies the memo per resource: share this one

    def ray_jobs(self, address: str, python: str | None, token: str | None) -> RayJobs:
        """One Jobs API client per Ray cluster, kept across reconciles: building one costs a
        version request (bench/operator_scale.py: 17% of the operator's time at 1,000 jobs). It
        holds no connection (each call is one `requests.request`), so it survives a restarted head
        and is safe to share between handler threads. A client whose version check fails is not
        kept (RayUnreachable propagates)."""
        key = (address, python, token)
        with self._ray_clients_lock:
            client = self._ray_clients.get(key)
        if client is None:
            client = RayJobs(address, python=python, token=token)
            with self._ray_clients_lock:
                self._ray_clients[key] = client
                while len(self._ray_clients) > _RAY_CLIENTS_KEPT:  # KubeRay: one cluster per job
                    del self._ray_clients[next(iter(self._ray_clients))]  # the oldest
        return client

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise RuntimeError("the operator runtime is not connected (its startup handler has not run)")
        return self._backend

    def connect(self, adopt: Any) -> None:
        """Kubernetes client, Ray backend, metrics endpoint. `adopt` is kopf.adopt (the KubeRay
        backend makes the job own what it creates)."""
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self.api_client = client.ApiClient()
        self._backend = self._make_backend(adopt)
        metrics.register_phase_source(self.index.phase_counts)
        metrics.serve(self.settings.metrics_port)
        log.info(
            "forgeline operator: backend=%s, cap=%s, metrics on :%d",
            self.settings.backend,
            self.settings.max_running_jobs or "none",
            self.settings.metrics_port,
        )

    def _make_backend(self, adopt: Any) -> Backend:
        s = self.settings
        if s.backend == "local":
            self.local_ray = LocalRay(num_cpus=s.local_num_cpus)
            self.local_ray.start()
            log.info("embedded Ray head at %s", self.local_ray.address)
            return LocalBackend(self.local_ray, sys.executable)
        if s.backend == "address":
            if not s.ray_address:
                raise ValueError("FORGELINE_BACKEND=address needs FORGELINE_RAY_ADDRESS")
            return AddressBackend(s.ray_address, s.ray_token)
        return KubeRayBackend(self.api_client, s.default_trainer_image, adopt, s.node_pools)

    def close(self) -> None:
        if self.local_ray is not None:
            self.local_ray.stop()

    def backend_for(self, job: Job) -> Backend:
        """spec.ray.address names an existing Ray cluster for this job, whatever the operator's backend."""
        if job.spec.ray.address:
            return AddressBackend(job.spec.ray.address, self.settings.ray_token)
        return self.backend
