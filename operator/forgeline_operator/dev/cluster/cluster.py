"""A whole test cluster that runs pods: the control plane with its controllers, the nodes of
kind-config.yaml (each a containerd + kubelet + kube-proxy in its own network namespace), CoreDNS,
a default StorageClass with volumes on this machine's disk, KubeRay (and Kueue, when asked).

    with KubeCluster(workdir) as cluster:
        cluster.kubectl("get", "pods", "-A")

`down()` leaves nothing behind: no process, mount, network namespace, bridge, iptables rule or
cgroup of the cluster (`leftovers()` lists any that remain; a test asserts it is empty)."""

from __future__ import annotations

import base64
import copy
import functools
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from ...rayclient.ports import free_port
from . import addons, binaries, images
from .controlplane import ControlPlane
from .network import Fabric
from .node import CONTAINERD_STATE, Node, NodeSpec, node_token, proxy_token
from .pools import node_specs

REPO = Path(__file__).resolve().parents[4]
KIND_CONFIG = REPO / "kind-config.yaml"
CHART = REPO / "helm" / "forgeline"
RELEASE, RELEASE_NS = "forgeline", "forgeline-system"
RAY_UID, RAY_GID = 1000, 100  # the trainer image's `ray` user; the Ray pods' fsGroup
SMALL = {"cpu": "500m", "memory": "4Gi", "sharedMemory": "256Mi", "head": {"cpu": "500m", "memory": "4Gi"}}
"""Ray pods small enough that a job's head and workers fit beside the operator and CoreDNS on a
node with 2 CPUs (the examples ask for a whole CPU per worker and the head's default). 4Gi for
the head and each worker: with 2Gi, Ray's memory monitor killed the LoRA SFT stage's actors (the
driver runs in the head pod and prepares the data and the evals there: 1.92 of 2.00 GB)."""


def on_a_small_cluster(doc: dict[str, Any], claim: str = "work", **resources: Any) -> dict[str, Any]:
    """A shipped example as a user runs it on a cluster: its output on a volume (`pvc://claim/name`;
    a relative path would be written inside the worker's container), its data still relative (the
    trainer image carries examples/data), its pods sized by SMALL (and `resources`)."""
    doc = copy.deepcopy(doc)
    doc["spec"]["output"]["uri"] = f"pvc://{claim}/{doc['metadata']['name']}"
    doc["spec"]["resources"] = {**doc["spec"].get("resources", {}), **SMALL, **resources}
    return doc


class KubeCluster:
    def __init__(
        self,
        workdir: Path,
        nodes: list[NodeSpec] | None = None,
        kuberay: bool = True,
        kueue: bool = False,
        log: Any = None,
    ) -> None:
        self.workdir = workdir
        self.specs = nodes if nodes is not None else node_specs(KIND_CONFIG)
        self.with_kuberay = kuberay
        self.with_kueue = kueue
        self.fabric: Fabric | None = None
        self.control_plane: ControlPlane | None = None
        self.nodes: list[Node] = []
        self.controllers: dict[str, addons.HostController] = {}
        self.timings: dict[str, float] = {}
        self._loaded: set[str] = set()
        self._log = log or (lambda msg: None)

    # -- up and down ---------------------------------------------------------------------------

    def __enter__(self) -> KubeCluster:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    @property
    def kubeconfig(self) -> Path:
        assert self.control_plane is not None
        return self.control_plane.kubeconfig

    def up(self, timeout: float = 180) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self._timed("network"):
            self.fabric = Fabric.allocate()
            self.fabric.create()
        tokens: dict[str, tuple[str, list[str]]] = {}
        for spec in self.specs:
            tokens[node_token(spec.name)] = (f"system:node:{spec.name}", ["system:nodes"])
            tokens[proxy_token(spec.name)] = ("system:kube-proxy", [])
        with self._timed("control plane"):
            self.control_plane = ControlPlane(
                workdir=self.workdir / "control-plane",
                extra_tokens=tokens,
                bind_address=self.fabric.host_ip,
                controllers=True,
            )
            self.control_plane.start()
        with self._timed("system images"):
            pause, coredns = images.pause_image(), images.coredns_image()
        with self._timed("nodes"):
            for i, spec in enumerate(self.specs):
                node = Node(
                    spec,
                    i,
                    self.fabric,
                    self.workdir / "nodes" / spec.name,
                    self.control_plane.pki,
                    self.control_plane.url,
                    len(self.specs),
                    pause,
                )
                self.nodes.append(node)
                node.start()
            self.load_images([pause, coredns])
            self._wait_nodes_ready(timeout)
            self._advertise_extended_resources()
        with self._timed("addons"):
            self.apply_objects(addons.coredns_manifests(coredns))
            self.apply_objects([addons.storage_class()])
            if self.with_kuberay:
                self.install_kuberay()
            if self.with_kueue:
                self.install_kueue()
            rollout = ("rollout", "status", "deploy/coredns", f"--timeout={int(timeout)}s")
            self.kubectl("-n", "kube-system", *rollout, timeout=timeout + 10)
        self._log(f"cluster up: {', '.join(f'{k} {v:.1f}s' for k, v in self.timings.items())}")

    def down(self) -> list[str]:
        """Stop everything; what could not be cleaned up (also raised nowhere: callers assert on it)."""
        problems: list[str] = []
        for controller in self.controllers.values():
            controller.stop()
        self.controllers.clear()
        for node in reversed(self.nodes):
            problems += node.stop()
        if self.control_plane is not None:
            self.control_plane.stop()
        if self.fabric is not None:
            problems += self.fabric.destroy([s.name for s in self.specs])
        return problems + self.leftovers()

    def leftovers(self) -> list[str]:
        """What of this cluster still exists on the machine: processes (by mount namespace and
        cgroup), cgroups, network namespaces and the bridge, mounts under the work directory or
        containerd's directories in this machine's mount namespace."""
        found: list[str] = []
        if self.fabric is not None:
            found += self.fabric.leftovers()
        for node in self.nodes:
            found += [f"cgroup {d}" for d in node._cgroup_dirs()]
            if node.anchor is not None and node.anchor.poll() is None:
                found.append(f"process {node.anchor.pid} (the node {node.name}'s namespace anchor)")
        # mounts in this machine's namespace: under the work directory, or made by a containerd
        # that ran outside its node's mount namespace (its state directory, the node's root)
        outside = [str(self.workdir), CONTAINERD_STATE, *(str(n.containerd_root) for n in self.nodes)]
        points = [m.split()[4] for m in Path("/proc/self/mountinfo").read_text().splitlines()]
        found += [f"mount {p}" for p in points if any(p == o or p.startswith(o + "/") for o in outside)]
        for controller in self.controllers.values():
            if controller.alive():
                found.append(f"process {controller.name}")
        return found

    # -- images ---------------------------------------------------------------------------------

    def load_images(self, references: list[str]) -> dict[str, int]:
        """Import images into every node that lacks them, sending each node only the layers it has
        not unpacked yet, then dropping the layer blobs (the snapshots are what runs); older tags
        of the same images are removed from the nodes. Bytes of layers sent per node. One node at
        a time: it is disk-bound, and it keeps the disk's peak low."""
        sent: dict[str, int] = {}
        descs = {ref: images.export(ref) for ref in references}
        for node in self.nodes:
            for ref in references:
                if self._has_image(node, ref):
                    continue
                layers = images.missing_layers(descs[ref], node.snapshots())
                desc = descs[ref]

                write = functools.partial(
                    images.write_import_stream, reference=ref, manifest_desc=desc, layers=layers
                )
                sent[node.name] = sent.get(node.name, 0) + node.import_stream(write)
                node.discard_content(images.blobs_of(desc)[1])
                repo = ref.rsplit(":", 1)[0]
                node.remove_images([i for i in node.images() if i.startswith(repo + ":") and i != ref])
        self._loaded |= set(references)
        images.prune_layout(keep=self._loaded)
        return sent

    def build_and_load_images(self) -> dict[str, str]:
        """The operator and trainer images from the repository's Dockerfiles, in every node."""
        refs = {}
        for recipe in (images.OPERATOR, images.TRAINER):
            with self._timed(f"image {recipe.name}"):
                refs[recipe.name] = images.build(recipe, REPO, self.workdir / "image-builds")
        with self._timed("image import"):
            sent = self.load_images(list(refs.values()))
        self._log(f"image layers sent to nodes: {sent}")
        return refs

    @staticmethod
    def _has_image(node: Node, reference: str) -> bool:
        names = node.images()
        return reference in names or f"docker.io/{reference}" in names

    # -- Kubernetes objects ----------------------------------------------------------------------

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        argv = [binaries.find_binary("kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        proc = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def apply_objects(self, objects: list[dict[str, Any]], server_side: bool = True) -> None:
        text = yaml.safe_dump_all(objects)
        args = ["apply", "--server-side", "--force-conflicts"] if server_side else ["apply"]
        self.kubectl(*args, "-f", "-", input=text)

    def install_kuberay(self) -> None:
        """KubeRay's CRDs from its own module (server-side: they are too large for the
        last-applied annotation), then its operator out of cluster."""
        for crd in binaries.crds("kuberay"):
            self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
        for crd in ("rayclusters.ray.io", "rayjobs.ray.io", "rayservices.ray.io"):
            self.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
        controller = addons.kuberay_operator(self.kubeconfig, self.workdir / "kuberay-operator.log")
        controller.start()
        self.controllers["kuberay"] = controller

    def helm(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """helm against this cluster, its config and cache in the work directory."""
        home = self.workdir / "helm-home"
        env = {
            **os.environ,
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_DATA_HOME": str(home / "data"),
        }
        argv = [binaries.find_binary("helm"), *args, "--kubeconfig", str(self.kubeconfig)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(
                f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def install_forgeline(self, images: dict[str, str], *values: str) -> str:
        """`helm install` of Forgeline's chart (its CRDs included) with the images built here; the
        operator runs as the chart's Deployment in a namespace that enforces Pod Security
        `restricted`. `values`: more `--set` strings. The install's output (NOTES)."""
        repo, tag = images["operator"].rsplit(":", 1)
        labels = {"pod-security.kubernetes.io/enforce": "restricted"}
        self.apply_objects(
            [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": RELEASE_NS, "labels": labels}}]
        )
        sets = [f"image.repository={repo},image.tag={tag},image.pullPolicy=Never"]
        sets += [f"defaults.trainerImage={images['trainer']}", *values]
        args = [a for s in sets for a in ("--set", s)]
        with self._timed("helm install"):
            return self.helm(
                "install", RELEASE, str(CHART), "-n", RELEASE_NS, *args, "--wait", "--timeout=240s"
            ).stdout

    def work_volume(self, namespace: str, path: Path, claim: str = "work", size: str = "10Gi") -> None:
        """A `claim` PersistentVolumeClaim in `namespace` bound to `path` on this machine (made and
        given to the Ray pods' user), so `pvc://claim/...` URIs are real mounts in the Ray pods."""
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, RAY_UID, RAY_GID)
        pvc = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": addons.STORAGE_CLASS,
                "resources": {"requests": {"storage": size}},
            },
        }
        pv = addons.hostpath_volume(f"{claim}-{namespace}", path, size, namespace, claim)
        self.apply_objects([pv, pvc])

    def install_kueue(self) -> None:
        """Kueue's CRDs from its own module, its manager out of cluster (webhook on the host
        bridge, certificate from the cluster's PKI), then its webhook configurations pointing at
        it: registered once it is ready, so the apiserver never calls a webhook that is not there."""
        assert self.control_plane is not None and self.fabric is not None
        for crd in binaries.crds("kueue"):
            self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
        for kind in ("clusterqueues", "localqueues", "resourceflavors", "workloads"):
            self.kubectl("wait", "--for=condition=Established", f"crd/{kind}.kueue.x-k8s.io", "--timeout=60s")
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": addons.KUEUE_NAMESPACE}}
        self.apply_objects([namespace])
        workdir = self.workdir / "kueue"
        cert_dir = workdir / "webhook-certs"
        cert_dir.mkdir(parents=True, exist_ok=True)
        host = self.fabric.host_ip
        pair = self.control_plane.pki.serving("kueue-webhook", "kueue-webhook", [host], [])
        (cert_dir / "tls.crt").write_bytes(pair.cert.read_bytes())
        (cert_dir / "tls.key").write_bytes(pair.key.read_bytes())
        port = free_port()
        config = addons.kueue_config(host, port, cert_dir)
        controller = addons.kueue_manager(self.kubeconfig, config, workdir, pair.cert, pair.key)
        controller.start()
        self.controllers["kueue"] = controller
        ca_bundle = base64.b64encode(self.control_plane.ca_cert.read_bytes()).decode()
        hooks = addons.kueue_webhooks(
            binaries.webhook_manifests("kueue"), f"https://{host}:{port}", ca_bundle
        )
        self.apply_objects(hooks)

    def _wait_nodes_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        want = {s.name for s in self.specs}
        while True:
            out = self.kubectl("get", "nodes", "-o", "json", check=False).stdout
            ready = set()
            if out:
                for item in json.loads(out)["items"]:
                    conds = {c["type"]: c["status"] for c in item["status"].get("conditions", [])}
                    if conds.get("Ready") == "True":
                        ready.add(item["metadata"]["name"])
            if want <= ready:
                return
            for node in self.nodes:
                if node.exited():
                    raise RuntimeError(
                        f"node {node.name}: {node.exited()} exited:\n{node.log_tail('kubelet')}"
                    )
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes not Ready after {timeout}s: {sorted(want - ready)}")
            time.sleep(0.5)

    def _advertise_extended_resources(self) -> None:
        """Kubernetes' documented way to advertise an extended resource: a JSON patch of the
        node's status capacity (https://kubernetes.io/docs/tasks/administer-cluster/extended-resource-node/)."""
        for spec in self.specs:
            if not spec.extended_resources:
                continue
            patch = [
                {"op": "add", "path": f"/status/capacity/{name.replace('/', '~1')}", "value": value}
                for name, value in spec.extended_resources.items()
            ]
            self.kubectl(
                "patch", "node", spec.name, "--subresource=status", "--type=json", "-p", json.dumps(patch)
            )
            deadline = time.monotonic() + 30
            while True:
                node = json.loads(self.kubectl("get", "node", spec.name, "-o", "json").stdout)
                alloc = node["status"].get("allocatable", {})
                if all(alloc.get(k) == v for k, v in spec.extended_resources.items()):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{spec.name}: allocatable never showed {spec.extended_resources}")
                time.sleep(0.5)

    # -- diagnostics ------------------------------------------------------------------------------

    def diagnostics(self, namespace: str | None = None, log_lines: int = 30) -> str:
        """What a person would look at when an end-to-end test fails (as KubeRay's e2e support
        prints): pods with phases and nodes, `describe` of those not ready, the last lines of every
        container's log, Events, RayClusters' status, and the controllers' log tails."""
        ns = ["-n", namespace] if namespace else ["-A"]
        out: list[str] = []

        def section(title: str, *args: str) -> None:
            proc = self.kubectl(*args, check=False, timeout=30)
            out.append(f"===== {title}\n{proc.stdout}{proc.stderr}")

        section("nodes", "get", "nodes", "-o", "wide")
        section("pods", "get", "pods", *ns, "-o", "wide")
        section("rayclusters", "get", "rayclusters", *ns, "-o", "yaml")
        section("events", "get", "events", *ns, "--sort-by=.lastTimestamp")
        pods = json.loads(
            self.kubectl("get", "pods", *ns, "-o", "json", check=False).stdout or '{"items": []}'
        )
        for pod in pods["items"]:
            meta, status = pod["metadata"], pod.get("status", {})
            ready = all(c.get("ready") for c in status.get("containerStatuses", []) or [{}])
            if not ready or status.get("phase") not in ("Running", "Succeeded"):
                section(
                    f"describe {meta['namespace']}/{meta['name']}",
                    "describe",
                    "pod",
                    "-n",
                    meta["namespace"],
                    meta["name"],
                )
            for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
                section(
                    f"log {meta['namespace']}/{meta['name']} [{c['name']}]",
                    "logs", "-n", meta["namespace"], meta["name"], "-c", c["name"], f"--tail={log_lines}",
                )  # fmt: skip
        for name, controller in self.controllers.items():
            text = controller.log.read_text(errors="replace") if controller.log.exists() else ""
            out.append(f"===== {name} log (tail)\n" + "\n".join(text.splitlines()[-log_lines:]))
        for node in self.nodes:
            out.append(f"===== {node.name} kubelet log (tail)\n{node.log_tail('kubelet', log_lines)}")
        return "\n".join(out)

    def _timed(self, what: str) -> _Timer:
        return _Timer(self.timings, what)


class _Timer:
    def __init__(self, into: dict[str, float], key: str) -> None:
        self.into, self.key = into, key

    def __enter__(self) -> None:
        self.start = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        self.into[self.key] = time.monotonic() - self.start
