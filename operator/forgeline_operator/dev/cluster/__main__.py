"""Bring the test cluster up and down by hand.

    python -m forgeline_operator.dev.cluster up        # returns once it is ready; prints KUBECONFIG
    python -m forgeline_operator.dev.cluster status
    python -m forgeline_operator.dev.cluster down      # nothing left behind
    python -m forgeline_operator.dev.cluster images    # build the operator and trainer images
                                                       # (--export: for nodes; --load: into this one)

`up` starts a supervisor process that holds the cluster (its components are its children) and
tears it down on SIGTERM or `down`; its log and the cluster's files are in the work directory
($FORGELINE_CACHE/devcluster by default). Needs root (network namespaces, cgroups, mounts).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .binaries import CACHE, find_binary

STATE_DIR = CACHE / "devcluster"
STATE = STATE_DIR / "state.json"


def _read_state() -> dict | None:
    try:
        return json.loads(STATE.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def serve(workdir: Path, kueue: bool, images: bool) -> int:
    """The supervisor: up, write the state, wait for SIGTERM, down."""
    from .cluster import KubeCluster

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    cluster = KubeCluster(workdir, log=lambda m: print(m, flush=True), kueue=kueue)
    try:
        cluster.up()
        refs = cluster.build_and_load_images() if images else {}
        state = {"pid": os.getpid(), "workdir": str(workdir), "kubeconfig": str(cluster.kubeconfig)}
        state["nodes"] = {n.name: n.anchor.pid for n in cluster.nodes if n.anchor is not None}
        STATE.write_text(json.dumps({**state, "images": refs}))
        print("READY", flush=True)
        while not stop.wait(1.0):
            pass
    except Exception as exc:  # noqa: BLE001 - reported to the `up` that waits for us, then torn down
        print(f"FAILED: {exc}", flush=True)
    finally:
        problems = cluster.down()
        print(f"DOWN: {problems or 'clean'}", flush=True)
        STATE.unlink(missing_ok=True)
    return 0


def up(args: argparse.Namespace) -> int:
    state = _read_state()
    if state and _alive(state["pid"]):
        print(f"already up (pid {state['pid']}): export KUBECONFIG={state['kubeconfig']}")
        return 0
    workdir = Path(args.workdir or STATE_DIR / "cluster")
    subprocess.run(["rm", "-rf", str(workdir)], check=True)
    workdir.mkdir(parents=True)
    log = workdir / "supervisor.log"
    argv = [sys.executable, "-m", "forgeline_operator.dev.cluster", "serve", "--workdir", str(workdir)]
    argv += ["--kueue"] if args.kueue else []
    argv += ["--images"] if args.images else []
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    started = time.monotonic()
    while True:
        text = log.read_text(errors="replace")
        if "READY" in text:
            state = _read_state() or {}
            print(f"up in {time.monotonic() - started:.0f}s; kubectl and helm with:")
            print(f"  export KUBECONFIG={state.get('kubeconfig')}")
            for name, ref in (state.get("images") or {}).items():
                print(f"  {name} image: {ref}")
            return 0
        if proc.poll() is not None or "FAILED" in text:
            print(text[-4000:], file=sys.stderr)
            return 1
        time.sleep(1)


def down(_: argparse.Namespace) -> int:
    state = _read_state()
    if not state:
        print("no cluster is up")
        return 0
    pid = state["pid"]
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 120
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.5)
    log = Path(state["workdir"]) / "supervisor.log"
    last = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("DOWN")]
    print(last[-1] if last else f"the supervisor (pid {pid}) left no report; see {log}")
    STATE.unlink(missing_ok=True)
    return 0 if last and last[-1] == "DOWN: clean" else 1


def status(_: argparse.Namespace) -> int:
    state = _read_state()
    if not state or not _alive(state["pid"]):
        print("no cluster is up")
        return 1
    print(f"supervisor pid {state['pid']}; export KUBECONFIG={state['kubeconfig']}")
    kubectl = [find_binary("kubectl"), "--kubeconfig", state["kubeconfig"]]
    subprocess.run([*kubectl, "get", "nodes", "-o", "wide"])
    subprocess.run([*kubectl, "get", "pods", "-A", "-o", "wide"])
    return 0


def build_images(args: argparse.Namespace) -> int:
    """Build the images; with --load, also import them into the running cluster's nodes."""
    from . import images
    from .cluster import REPO, KubeCluster
    from .node import Node

    refs = []
    for recipe in (images.OPERATOR, images.TRAINER):
        started = time.monotonic()
        refs.append(images.build(recipe, REPO, STATE_DIR / "logs"))
        print(f"{recipe.name}: {refs[-1]} ({time.monotonic() - started:.0f}s)")
    if args.export:
        started = time.monotonic()
        for ref in refs:
            images.export(ref)
        print(f"exported to the OCI layout nodes import from in {time.monotonic() - started:.0f}s")
    state = _read_state()
    if args.load and state and _alive(state["pid"]):
        cluster = KubeCluster(Path(state["workdir"]), kuberay=False)
        cluster.nodes = [Node.attach(name, pid) for name, pid in state.get("nodes", {}).items()]
        started = time.monotonic()
        sent = cluster.load_images(refs)
        print(f"loaded into {', '.join(cluster.nodes[i].name for i in range(len(cluster.nodes)))} "
              f"in {time.monotonic() - started:.0f}s (layer bytes sent: {sent})")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m forgeline_operator.dev.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the cluster (returns when it is ready)")
    p_up.add_argument("--workdir", help="the cluster's files (default $FORGELINE_CACHE/devcluster/cluster)")
    p_up.add_argument("--kueue", action="store_true", help="also run Kueue")
    p_up.add_argument("--images", action="store_true", help="build and load the operator and trainer images")
    sub.add_parser("down", help="stop it and remove everything it made")
    sub.add_parser("status", help="nodes and pods")
    p_images = sub.add_parser("images", help="build the operator and trainer images from their Dockerfiles")
    p_images.add_argument("--load", action="store_true", help="and import them into the running cluster")
    p_images.add_argument("--export", action="store_true", help="and export them for the nodes (make setup)")
    p_serve = sub.add_parser("serve", help=argparse.SUPPRESS)
    p_serve.add_argument("--workdir", required=True)
    p_serve.add_argument("--kueue", action="store_true")
    p_serve.add_argument("--images", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(Path(args.workdir), args.kueue, args.images)
    return {"up": up, "down": down, "status": status, "images": build_images}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
