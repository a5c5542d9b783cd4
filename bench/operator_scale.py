"""The operator at scale: reconcile latency, progress latency, apiserver requests and footprint
with 10, 100 (and 1,000) jobs.

    .venv/bin/python bench/operator_scale.py [--full] [--out bench/results.md]

Quick mode runs 10 and 100 jobs; `--full` adds 1,000. For each scale, against the real control
plane (etcd + kube-apiserver 1.20, with an audit log) and a fresh real operator process
(`python -m forgeline_operator`, backend=address, no running-jobs cap, default 3 s reconcile
interval), with a Ray Jobs API that does no training (tests/rayjobs_standin.py, run in a child
process of its own so that its work does not slow the bench's clocks):

1. N TrainingJobs are created at once (4 client threads, one POST each, the time taken just
   before each POST is sent); a watch (raw HTTP, its own thread) stamps every event on arrival;
2. create → Provisioning: the first watch event showing status.phase == Provisioning, minus
   that job's create time (client side: creationTimestamp has 1 s resolution);
3. progress record → status: the stand-in "writes" step s's record into the job's log at
   submitted + s × seconds_per_step (CLOCK_MONOTONIC, shared by all processes). Two latencies:
   for every record, until the first watch event whose status.progress.step is s or later (how
   stale the status is: the operator reads the log once per reconcile, so a record waits for
   the next read); and for the records the status did show, until it showed them (the read →
   status path alone);
4. the jobs run to Succeeded and are then deleted (the operator's finalizer runs); the
   apiserver's audit log (level Metadata, stage ResponseComplete) is filtered on the operator's
   own user (it gets a token of its own) from just before the creates to the last deletion, and
   counted by verb and resource, per job;
5. the operator's RSS (peak, sampled every 0.2 s) and CPU seconds (utime + stime from /proc)
   over the same window.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing as mp
import os
import platform
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.rayjobs_standin

from forgeline_operator.dev.cluster import ADMIN_TOKEN, ControlPlane, find_binary  # noqa: E402
from forgeline_operator.dev.operator_process import OperatorProcess  # noqa: E402

GROUP, VERSION, PLURAL = "forgeline.dev", "v1alpha1", "trainingjobs"
OPERATOR_USER, OPERATOR_TOKEN = "forgeline-operator", "forgeline-operator-token"
SECONDS_PER_STEP = 0.1
STEPS = 60  # a 6 s "run": 12 progress records (one every 5 steps), about 2 log reads per job
CREATE_THREADS = 4
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
"""


# -- the control plane, with an audit log ------------------------------------------------------


class AuditedControlPlane(ControlPlane):
    """devcluster's control plane, plus an audit log of every request (level Metadata)."""

    def _apiserver_command(self) -> list[str]:
        policy = self.workdir / "audit-policy.yaml"
        policy.write_text(AUDIT_POLICY)
        return [
            *super()._apiserver_command(),
            f"--audit-policy-file={policy}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
            "--audit-log-maxsize=0",
        ]

    @property
    def audit_log(self) -> Path:
        return self.workdir / "audit.log"


def audit_counts(path: Path, start: int, end: int, user: str) -> Counter[tuple[str, str]]:
    """(verb, resource[/subresource]) → requests by `user` in the audit log's bytes [start, end)."""
    counts: Counter[tuple[str, str]] = Counter()
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    for line in data.splitlines():
        if not line.strip():
            continue
        ev = json.loads(line)
        if ev.get("user", {}).get("username") != user:
            continue
        ref = ev.get("objectRef") or {}
        res = ref.get("resource") or ev.get("requestURI", "?").split("?")[0]
        if ref.get("subresource"):
            res += "/" + ref["subresource"]
        counts[(ev.get("verb", "?"), res)] += 1
    return counts


def _stamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def audit_breakdown(
    path: Path, start: int, end: int, ns: str, seen_wall: dict[str, float], sent_wall: dict[str, float]
) -> dict[str, list[float]]:
    """Where each job's create → Provisioning went, from the audit log's request times (µs):
    the create request itself; the operator's time before its first write of the job (watch
    delivery, kopf's queue, the create handler); the apiserver's time serving the operator's
    writes up to and including the Provisioning status patch; the rest of the operator's time
    between them (the reconcile timer's 0.5 s initial delay, kopf's processing of its own writes,
    the thread pool); and the bench's watch seeing it."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    create: dict[str, tuple[float, float]] = {}
    writes: dict[str, list[tuple[float, float, bool]]] = {}
    for line in data.splitlines():
        if not line.strip():
            continue
        ev = json.loads(line)
        ref = ev.get("objectRef") or {}
        if ref.get("namespace") != ns or ref.get("resource") != PLURAL or not ref.get("name"):
            continue
        got, done = _stamp(ev["requestReceivedTimestamp"]), _stamp(ev["stageTimestamp"])
        user = ev.get("user", {}).get("username")
        if user == OPERATOR_USER and ev.get("verb") in ("patch", "update"):
            writes.setdefault(ref["name"], []).append((got, done, ref.get("subresource") == "status"))
        elif ev.get("verb") == "create":
            create[ref["name"]] = (got, done)
    parts: dict[str, list[float]] = {k: [] for k in ("create", "before", "apiserver", "operator", "watch")}
    for name, seen in seen_wall.items():
        if name not in create or name not in writes or seen != seen:
            continue
        got, done = create[name]
        mine = sorted(w for w in writes[name] if w[1] <= seen + 0.05)  # the audit and our clock: same host
        status = [w for w in mine if w[2]]
        if not status:
            continue
        last = status[-1]  # the Provisioning patch: the last status write before the watch saw it
        upto = [w for w in mine if w[0] <= last[0]]
        served = sum(w[1] - w[0] for w in upto)
        parts["create"].append(done - sent_wall[name])
        parts["before"].append(upto[0][0] - done)
        parts["apiserver"].append(served)
        parts["operator"].append(last[1] - upto[0][0] - served)
        parts["watch"].append(seen - last[1])
    return parts


# -- the Ray stand-in in a process of its own ----------------------------------------------------


def _standin_main(conn: Any, seconds_per_step: float) -> None:
    from tests.rayjobs_standin import RayJobsStandIn

    head = RayJobsStandIn(seconds_per_step=seconds_per_step).start()
    conn.send(head.address)
    while True:
        msg = conn.recv()
        if msg == "jobs":  # (namespace, name) → (submitted on CLOCK_MONOTONIC, steps, attempts)
            with head.lock:
                out: dict[tuple[str, str], list[Any]] = {}
                for j in head.jobs.values():
                    key = (
                        j.metadata.get("forgeline.dev/namespace", ""),
                        j.metadata.get("forgeline.dev/job", ""),
                    )
                    if key in out:
                        out[key][2] += 1
                    else:
                        out[key] = [j.submitted, j.steps, 1]
            conn.send((out, list(head.duplicate_submits)))
        elif msg == "stop":
            head.stop()
            conn.send("stopped")
            return


class StandInProcess:
    def __init__(self, seconds_per_step: float) -> None:
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_standin_main, args=(child, seconds_per_step), daemon=True)
        self.proc.start()
        self.address: str = self.conn.recv()

    def jobs(self) -> tuple[dict[tuple[str, str], list[Any]], list[str]]:
        self.conn.send("jobs")
        return self.conn.recv()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.send("stop")
            self.conn.recv()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()


# -- the bench's own client: raw HTTP, so its clocks are not at the mercy of a heavy client -------


class Api:
    def __init__(self, cp: ControlPlane) -> None:
        self.host, self.port = "127.0.0.1", cp.port
        self.ctx = ssl.create_default_context(cafile=str(cp.ca_cert))
        self.ctx.check_hostname = False
        self.headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}

    def conn(self, timeout: float = 60) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        c = self.conn()
        try:
            c.request(method, path, body=None if body is None else json.dumps(body), headers=self.headers)
            resp = c.getresponse()
            data = resp.read()
            if resp.status >= 300:
                raise RuntimeError(f"{method} {path}: {resp.status} {data[:500]!r}")
            return json.loads(data) if data else None
        finally:
            c.close()


def jobs_path(ns: str, name: str = "") -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}" + (f"/{name}" if name else "")


@dataclass
class Watch:
    """Every watch event of the namespace's TrainingJobs, stamped on arrival (CLOCK_MONOTONIC)."""

    api: Api
    ns: str
    provisioning: dict[str, float] = field(default_factory=dict)
    steps: dict[tuple[str, int], float] = field(default_factory=dict)
    succeeded: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    deleted: dict[str, float] = field(default_factory=dict)
    events: int = 0
    closing: bool = False
    reconnects: int = 0

    def start(self) -> Watch:
        self.rv = self.api.request("GET", jobs_path(self.ns))["metadata"]["resourceVersion"]
        self._open()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _open(self) -> None:
        self.c = self.api.conn(timeout=3600)
        query = f"?watch=1&resourceVersion={self.rv}&timeoutSeconds=3600"
        self.c.request("GET", jobs_path(self.ns) + query, headers=self.api.headers)
        self.resp = self.c.getresponse()

    def _run(self) -> None:
        try:
            self._read()
        except Exception as exc:  # noqa: BLE001 - reported, the waits then time out
            if not self.closing:
                print(f"watch of {self.ns} ended: {exc!r}", file=sys.stderr, flush=True)

    def _read(self) -> None:
        if True:
            while True:
                line = self.resp.readline()
                now = time.monotonic()
                if not line:  # the apiserver ended the watch: resume where it stopped
                    if self.closing:
                        return
                    self.reconnects += 1
                    print(
                        f"watch of {self.ns}: resumed at {self.rv} after {self.events} events",
                        file=sys.stderr,
                    )
                    self._open()
                    continue
                ev = json.loads(line)
                obj = ev["object"]
                if ev["type"] == "ERROR":
                    raise RuntimeError(f"watch error: {obj}")
                self.events += 1
                self.rv = obj["metadata"]["resourceVersion"]
                name = obj["metadata"]["name"]
                if ev["type"] == "DELETED":
                    self.deleted[name] = now
                    continue
                status = obj.get("status") or {}
                phase = status.get("phase")
                if phase in ("Provisioning", "Running", "Succeeded") and name not in self.provisioning:
                    self.provisioning[name] = now if phase == "Provisioning" else float("nan")
                step = (status.get("progress") or {}).get("step")
                if step is not None:
                    self.steps.setdefault((name, int(step)), now)
                if phase == "Succeeded":
                    self.succeeded.setdefault(name, now)
                elif phase == "Failed":
                    self.failed[name] = status.get("message", "")

    def close(self) -> None:
        self.closing = True
        with contextlib.suppress(Exception):
            self.c.sock.shutdown(2)  # type: ignore[union-attr]
        with contextlib.suppress(Exception):
            self.c.close()


# -- one scale -------------------------------------------------------------------------------------


def job_doc(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples/pretrain-tiny-llama.yaml").read_text())
    doc["metadata"] = {"name": name}
    doc["spec"]["output"]["uri"] = f"runs/{name}"
    doc["spec"]["training"]["maxSteps"] = STEPS
    doc["spec"]["checkpointing"] = {"intervalSteps": 20, "keep": 2}
    return doc


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of 10 values is the largest)."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))]


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


@dataclass
class Result:
    jobs: int
    create_s: float
    to_provisioning: list[float]
    progress: list[float]
    """every record written → the status shows it or a newer one"""
    shown: list[float]
    """the records the status showed → when it showed them"""
    all_succeeded_s: float
    requests: Counter[tuple[str, str]]
    startup_requests: int
    idle_rss: int
    peak_rss: int
    cpu_s: float
    watch_events: int
    breakdown: dict[str, list[float]]
    apiserver_cpu_s: float
    etcd_cpu_s: float
    profile: str = ""


def run_scale(
    cp: AuditedControlPlane, api: Api, standin: StandInProcess, n: int, work: Path, profile: bool
) -> Result:
    ns = f"scale-{n}"
    api.request(
        "POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
    )
    opdir = work / f"op-{n}"
    opdir.mkdir()
    audit_start_op = cp.audit_log.stat().st_size
    proc = OperatorProcess(
        cp.kubeconfig_for(OPERATOR_TOKEN, opdir / "kubeconfig"),
        opdir,
        opdir / "operator.log",
        FORGELINE_BACKEND="address",
        FORGELINE_RAY_ADDRESS=standin.address,
        FORGELINE_MAX_RUNNING_JOBS="0",  # no cap: every job is admitted at once
        FORGELINE_WATCH_NAMESPACES=ns,
        FORGELINE_LOG_LEVEL="WARNING",
    )
    proc.start()
    spy = None
    try:
        assert proc.proc is not None
        op = psutil.Process(proc.proc.pid)
        time.sleep(3)  # settle: startup handlers done, watches open
        idle_rss = op.memory_info().rss
        peak = [idle_rss]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                with contextlib.suppress(psutil.Error):
                    peak[0] = max(peak[0], op.memory_info().rss)
                time.sleep(0.2)

        threading.Thread(target=sample, daemon=True).start()
        watch = Watch(api, ns).start()
        bodies = {
            f"job-{i:05d}": json.dumps(
                {**(d := job_doc(f"job-{i:05d}")), "metadata": {**d["metadata"], "namespace": ns}}
            )
            for i in range(n)
        }
        names = list(bodies)
        created: dict[str, float] = {}
        sent_wall: dict[str, float] = {}
        wall_offset = time.time() - time.monotonic()
        audit_start = cp.audit_log.stat().st_size
        startup_requests = sum(
            audit_counts(cp.audit_log, audit_start_op, audit_start, OPERATOR_USER).values()
        )
        cpu0 = sum(op.cpu_times()[:2])
        cp_cpu0 = control_plane_cpu(cp)
        if profile:
            spy_out = opdir / "py-spy.txt"
            spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(op.pid), "--format",
                 "raw", "--rate", "50", "--nonblocking", "--output", str(spy_out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1)

        def creator(part: list[str]) -> None:
            c = api.conn()
            for name in part:
                created[name] = time.monotonic()
                sent_wall[name] = created[name] + wall_offset
                c.request("POST", jobs_path(ns), body=bodies[name], headers=api.headers)
                resp = c.getresponse()
                data = resp.read()
                if resp.status != 201:
                    raise RuntimeError(f"create {name}: {resp.status} {data[:300]!r}")
            c.close()

        t0 = time.monotonic()
        threads = [
            threading.Thread(target=creator, args=(names[i::CREATE_THREADS],)) for i in range(CREATE_THREADS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        create_s = time.monotonic() - t0
        wait_for(lambda: len(watch.provisioning) == n, 120 + 2 * n, f"{n} jobs Provisioning")
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes its profile
            spy.wait(30)
        wait_for(lambda: len(watch.succeeded) + len(watch.failed) == n, 120 + 2 * n, f"{n} jobs Succeeded")
        all_succeeded_s = time.monotonic() - t0
        if watch.failed:
            raise RuntimeError(f"jobs failed: {list(watch.failed.items())[:3]}")
        api.request("DELETE", jobs_path(ns))  # deletecollection: the operator's finalizer runs
        wait_for(lambda: len(watch.deleted) == n, 120 + n, f"{n} jobs deleted")
        time.sleep(1)
        cpu_s = sum(op.cpu_times()[:2]) - cpu0
        cp_cpu = {k: v - cp_cpu0[k] for k, v in control_plane_cpu(cp).items()}
        stop.set()
        audit_end = cp.audit_log.stat().st_size
        watch.close()
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        proc.stop()
    jobs, duplicates = standin.jobs()
    if duplicates:
        raise RuntimeError(f"duplicate Ray submissions: {duplicates[:5]}")
    to_prov = [watch.provisioning[name] - created[name] for name in names]
    shown, every = [], []
    by_job: dict[str, list[tuple[int, float]]] = {}
    for (name, step), seen in watch.steps.items():
        by_job.setdefault(name, []).append((step, seen))
    for name, seen_steps in by_job.items():
        submitted, _, attempts = jobs[(ns, name)]
        if attempts != 1:
            continue
        seen_steps.sort()
        for step, seen in seen_steps:  # the records the status showed
            shown.append(seen - (submitted + step * SECONDS_PER_STEP))
        for step in range(5, STEPS + 1, 5):  # every record: until the status shows it or a newer one
            later = [t for s, t in seen_steps if s >= step]
            if later:
                every.append(later[0] - (submitted + step * SECONDS_PER_STEP))
    requests = audit_counts(cp.audit_log, audit_start, audit_end, OPERATOR_USER)
    seen_wall = {name: t + wall_offset for name, t in watch.provisioning.items()}
    breakdown = audit_breakdown(cp.audit_log, audit_start, audit_end, ns, seen_wall, sent_wall)
    text = ""
    if profile and (opdir / "py-spy.txt").exists():
        text = summarize_profile(opdir / "py-spy.txt")
    return Result(
        n, create_s, to_prov, every, shown, all_succeeded_s, requests, startup_requests,
        idle_rss, peak[0], cpu_s, watch.events, breakdown, cp_cpu["kube-apiserver"], cp_cpu["etcd"], text,
    )  # fmt: skip


def control_plane_cpu(cp: ControlPlane) -> dict[str, float]:
    """CPU seconds (user + system) of the control plane's etcd and kube-apiserver so far."""
    out = {}
    for proc in cp._procs:
        out[Path(str(proc.args[0])).name] = sum(psutil.Process(proc.pid).cpu_times()[:2])  # type: ignore[index]
    return out


def summarize_profile(path: Path, top: int = 12) -> str:
    """py-spy's raw (collapsed) stacks → the functions with the most samples (inclusive)."""
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        for frame in set(stack.split(";")):
            inclusive[frame] += int(count)
    generic = (
        "<module>",
        "asyncio/",
        "threading.py",
        "runpy",
        "concurrent/futures",
        "__main__.py",
        "running.py",
    )
    rows = [
        f"{c / total:6.1%}  {f}"
        for f, c in inclusive.most_common(top * 5)
        if not any(g in f for g in generic)
    ]
    return f"{total} samples\n" + "\n".join(rows[:top])


# -- the report --------------------------------------------------------------------------------------


def machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores"


def versions() -> str:
    import kopf

    out = subprocess.run([find_binary("kube-apiserver"), "--version"], capture_output=True, text=True).stdout
    etcd = subprocess.run([find_binary("etcd"), "--version"], capture_output=True, text=True).stdout
    etcd_v = next((line.split(":")[-1].strip() for line in etcd.splitlines() if "etcd Version" in line), "?")
    return f"{out.strip()}, etcd {etcd_v}, kopf {kopf.__version__}, Python {platform.python_version()}"


def per_job_table(results: list[Result]) -> list[str]:
    keys = sorted({k for r in results for k in r.requests}, key=lambda k: (k[1], k[0]))
    head = "| verb | resource | " + " | ".join(f"{r.jobs} jobs" for r in results) + " |"
    rows = [head, "| --- | --- | " + " | ".join("---:" for _ in results) + " |"]
    for verb, res in keys:
        rows.append(
            f"| {verb} | {res} | "
            + " | ".join(f"{r.requests[(verb, res)] / r.jobs:.2f}" for r in results)
            + " |"
        )
    rows.append(
        "| **all** | | " + " | ".join(f"**{sum(r.requests.values()) / r.jobs:.2f}**" for r in results) + " |"
    )
    return rows


def breakdown_table(results: list[Result]) -> list[str]:
    names = ("create", "before", "apiserver", "operator", "watch")
    heads = ("create request", "operator, to its first write", "apiserver, serving the operator's writes",
             "operator, between its writes", "bench's watch")  # fmt: skip
    rows = ["| jobs | " + " | ".join(heads) + " | total |", "| ---: " * (len(heads) + 2) + "|"]
    for r in results:
        b = r.breakdown
        if not b["create"]:
            continue
        mean = {k: sum(v) / len(v) for k, v in b.items()}
        cells = [f"{mean[k]:.2f} ({pct(b[k], 99):.2f})" for k in names]
        rows.append(f"| {r.jobs:,} | " + " | ".join(cells) + f" | {sum(mean.values()):.2f} |")
    return rows


def report(results: list[Result], command: str, wall: float) -> str:
    lines = [
        f"\n## Operator at scale, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n",
        f"Machine: {machine()}, no GPU, **shared** (other benchmarks ran on it at the same time, so "
        f"latencies and CPU figures are upper bounds); {versions()}. "
        f"Command: `{command}` ({wall:.0f} s in all).\n",
        "Real etcd + kube-apiserver (audit log on), a fresh real operator process per scale "
        "(backend=address, no running-jobs cap, reconcile interval 3 s, WARNING logs), the Ray "
        f"Jobs API stand-in of tests/rayjobs_standin.py in its own process ({STEPS} steps × "
        f"{SECONDS_PER_STEP} s, a progress record every 5 steps). Jobs created at once by "
        f"{CREATE_THREADS} client threads; latencies measured client side (create = just before "
        "the POST; seen = the bench's watch event). Each job runs to Succeeded and is then "
        "deleted; requests are the apiserver's audit log, user = the operator's own token, from "
        "the first create to the last deletion (watches counted once when opened).\n",
        "| jobs | created in | apiserver CPU | etcd CPU | create → Provisioning p50 | p99 | max "
        "| every progress record → status p50 | p99 | records shown → status p50 | p99 "
        "| create → all Succeeded | apiserver requests / job | operator CPU | CPU / job "
        "| RSS idle → peak |",
        "|" + " ---: |" * 16,
    ]
    for r in results:
        total = sum(r.requests.values())
        lines.append(
            f"| {r.jobs:,} | {r.create_s:.1f} s | {r.apiserver_cpu_s:.1f} CPU-s | "
            f"{r.etcd_cpu_s:.1f} CPU-s | {pct(r.to_provisioning, 50):.2f} s | "
            f"{pct(r.to_provisioning, 99):.2f} s | {max(r.to_provisioning):.2f} s | "
            f"{pct(r.progress, 50):.2f} s | {pct(r.progress, 99):.2f} s | "
            f"{pct(r.shown, 50):.2f} s | {pct(r.shown, 99):.2f} s | "
            f"{r.all_succeeded_s:.0f} s | {total / r.jobs:.1f} | {r.cpu_s:.1f} CPU-s | "
            f"{r.cpu_s / r.jobs * 1000:.0f} ms | {r.idle_rss / 2**20:.0f} → {r.peak_rss / 2**20:.0f} MiB |"
        )
    lines += [
        "",
        "Goal (issue 11): create → Provisioning p99 < 1 s at 1,000 jobs. "
        + goal_line(results)
        + " The progress latency is bounded below by the reconcile interval: the operator reads "
        "each running job's Ray log once per FORGELINE_RECONCILE_INTERVAL (3 s), so a record "
        "waits 0–3 s for the next read; the records the status does show (the newest at each read) "
        "reach it in the read → patch → watch time.",
        "",
        "Where create → Provisioning goes, per job, mean (p99) in seconds, from the audit log's "
        "request times: the create request; the operator before its first write of the job "
        "(watch delivery, kopf's queue, the create handler); the apiserver serving the "
        "operator's writes up to the Provisioning status patch (kopf's annotation patches, the "
        "Pending and Provisioning status patches); the operator's own time between those writes "
        "(the reconcile timer's 0.5 s initial delay, kopf re-reading its own writes, the handler, "
        "the 16-thread pool); the bench's watch seeing it.",
        "",
        *breakdown_table(results),
        "",
        "Apiserver requests per job by verb and resource (operator's user, audit log):",
        "",
        *per_job_table(results),
        "",
        f"Operator start-up (not per job): {results[0].startup_requests} requests.",
    ]
    for r in results:
        if r.profile:
            lines += [
                "",
                f"py-spy of the operator from the first create to the last Provisioning, {r.jobs} jobs "
                "(inclusive share of samples, top frames):",
                "",
                "```",
                r.profile,
                "```",
            ]
    return "\n".join(lines)


def goal_line(results: list[Result]) -> str:
    big = max(results, key=lambda r: r.jobs)
    p99 = pct(big.to_provisioning, 99)
    met = "met" if p99 < 1 else "**not met**"
    return (
        f"At {big.jobs:,} jobs p99 is {p99:.2f} s: {met}"
        + ("" if big.jobs >= 1000 else " (1,000 not run)")
        + "."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="add 1,000 jobs to 10 and 100")
    parser.add_argument("--scales", help="comma-separated job counts (overrides --full)")
    parser.add_argument("--profile", action="store_true", help="py-spy the operator while it admits")
    parser.add_argument("--out", default=str(REPO / "bench/results.md"))
    args = parser.parse_args()
    scales = (
        [int(s) for s in args.scales.split(",")] if args.scales else [10, 100, *([1000] if args.full else [])]
    )
    command = "python bench/operator_scale.py " + " ".join(sys.argv[1:])
    started = time.monotonic()
    standin = StandInProcess(SECONDS_PER_STEP)
    work = Path(tempfile.mkdtemp(prefix="forgeline-scale-"))
    results = []
    try:
        cp = AuditedControlPlane(
            workdir=work / "cp", extra_tokens={OPERATOR_TOKEN: (OPERATOR_USER, ["system:masters"])}
        )
        with cp:
            kubectl = [find_binary("kubectl"), "--kubeconfig", str(cp.kubeconfig)]
            subprocess.run([*kubectl, "apply", "-f", str(REPO / "crds")], check=True, capture_output=True)
            wait = [*kubectl, "wait", "--for=condition=Established", f"crd/{PLURAL}.{GROUP}", "--timeout=60s"]
            for _ in range(60):  # kubectl 1.20 fails at once while the CRD has no status yet
                if subprocess.run(wait, capture_output=True).returncode == 0:
                    break
                time.sleep(0.5)
            else:
                raise RuntimeError("the TrainingJob CRD did not become Established")
            api = Api(cp)
            for n in scales:
                r = run_scale(cp, api, standin, n, work, args.profile)
                print(
                    f"{n} jobs: create→Provisioning p50 {pct(r.to_provisioning, 50):.2f}s "
                    f"p99 {pct(r.to_provisioning, 99):.2f}s; progress p50 {pct(r.progress, 50):.2f}s "
                    f"p99 {pct(r.progress, 99):.2f}s; {sum(r.requests.values()) / n:.1f} requests/job; "
                    f"CPU {r.cpu_s:.1f}s; peak RSS {r.peak_rss / 2**20:.0f} MiB",
                    flush=True,
                )
                results.append(r)
    finally:
        standin.stop()
    text = report(results, command.strip(), time.monotonic() - started)
    print(text)
    with open(args.out, "a") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
