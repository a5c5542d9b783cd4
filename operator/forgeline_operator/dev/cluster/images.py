"""The test cluster's images, built here with buildah (no Docker engine, no registry) and imported
into each node's containerd:

- the operator and trainer images, from the repository's own Dockerfiles, on the Debian base that
  tests/setup/build_base_image.sh makes with debootstrap (passed as the BASE_IMAGE build argument);
- the pod sandbox (`pause`, built from Kubernetes' own pause.c) and CoreDNS, each one static binary
  in an image of its own.

An image's tag is a hash of everything it is built from, so an unchanged tree builds and imports
nothing, and a changed one gets a new tag (pods never run a stale image under an old name).
Build times and sizes are recorded in $FORGELINE_CACHE/images/builds.json (docs/performance.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import binaries

REGISTRY = "forgeline.local"
BASE_IMAGE = os.environ.get("FORGELINE_BASE_IMAGE", "localhost/forgeline/base:bookworm-py311")
IMAGES_DIR = binaries.CACHE / "images"
STORAGE_CONF = binaries.CACHE / "containers" / "storage.conf"
_EXCLUDED_PARTS = {"__pycache__", ".pytest_cache", ".hypothesis", ".venv", "runs"}


def buildah(*args: str, timeout: float = 3600, log: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(STORAGE_CONF)}
    if log is not None:
        with open(log, "w") as out:
            proc = subprocess.run(["buildah", *args], stdout=out, stderr=subprocess.STDOUT, text=True,
                                  env=env, timeout=timeout)  # fmt: skip
        if proc.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            raise RuntimeError(f"buildah {' '.join(args[:3])} ... failed ({proc.returncode}); {log}:\n{tail}")
        return proc
    proc = subprocess.run(["buildah", *args], capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _files(repo: Path, paths: Iterable[str]) -> list[Path]:
    out: list[Path] = []
    for rel in paths:
        p = repo / rel
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out += [
                f
                for f in p.rglob("*")
                if f.is_file()
                and not (_EXCLUDED_PARTS & set(f.relative_to(repo).parts))
                and f.suffix != ".pyc"
            ]
    return sorted(out)


def content_tag(repo: Path, paths: Iterable[str], extra: str = "") -> str:
    """12 hex digits over the named files' paths and bytes (and `extra`, e.g. the base image's ID)."""
    h = hashlib.sha256(extra.encode())
    for f in _files(repo, paths):
        h.update(str(f.relative_to(repo)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class ImageRecipe:
    name: str
    dockerfile: str
    context: tuple[str, ...]
    """What the Dockerfile copies (the tag hashes exactly this)."""

    def reference(self, repo: Path) -> str:
        base_id = buildah("images", "--noheading", "--format", "{{.ID}}", BASE_IMAGE).stdout.strip()
        return f"{REGISTRY}/{self.name}:{content_tag(repo, (self.dockerfile, *self.context), base_id)}"


TRAINER = ImageRecipe(
    "trainer",
    "trainer_image/Dockerfile",
    ("trainer_image", "operator", "pyproject.toml", "README.md", "examples", ".dockerignore"),
)
OPERATOR = ImageRecipe(
    "operator",
    "operator/Dockerfile",
    ("trainer_image", "operator", "pyproject.toml", "README.md", ".dockerignore"),
)


def exists(reference: str) -> bool:
    env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(STORAGE_CONF)}
    return (
        subprocess.run(
            ["buildah", "inspect", "--type", "image", reference], capture_output=True, env=env
        ).returncode
        == 0
    )


def _record(reference: str, seconds: float) -> None:
    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
    path = IMAGES_DIR / "builds.json"
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        records = {}
    size = buildah("images", "--noheading", "--format", "{{.Size}}", reference).stdout.strip()
    records[reference] = {
        "seconds": round(seconds, 1),
        "size": size,
        "built": time.strftime("%FT%TZ", time.gmtime()),
    }
    path.write_text(json.dumps(records, indent=2) + "\n")


def build(recipe: ImageRecipe, repo: Path, log_dir: Path) -> str:
    """The recipe's image from its Dockerfile on the debootstrap base (cached by content tag)."""
    reference = recipe.reference(repo)
    if exists(reference):
        return reference
    started = time.monotonic()
    log_dir.mkdir(parents=True, exist_ok=True)
    buildah(
        "build", "--layers", "--pull-never", "--isolation", "chroot", "--network", "host",
        "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-f", str(repo / recipe.dockerfile), "-t", reference,
        str(repo), log=log_dir / f"build-{recipe.name}.log",
    )  # fmt: skip
    _record(reference, time.monotonic() - started)
    _remove_older_tags(reference)
    return reference


def _remove_older_tags(reference: str) -> None:
    """Untag the same image's earlier builds (their shared layers stay; only their own go)."""
    repo = reference.rsplit(":", 1)[0]
    names = buildah("images", "--noheading", "--format", "{{.Name}}:{{.Tag}}").stdout.split()
    old = [n for n in names if n.startswith(repo + ":") and n != reference]
    for name in old:  # one at a time: a tag a build killed half-way still holds is left, and said
        try:
            buildah("rmi", name)
        except RuntimeError as err:
            print(f"forgeline: kept {name}: {err}", file=sys.stderr)


def _single_binary(reference: str, binary: str, entrypoint: list[str], user: str | None = None) -> str:
    if exists(reference):
        return reference
    started = time.monotonic()
    ctr = buildah("from", "scratch").stdout.strip()
    try:
        buildah("copy", "--chmod", "0755", ctr, binary, entrypoint[0])
        buildah("config", "--entrypoint", json.dumps(entrypoint), *(["--user", user] if user else []), ctr)
        buildah("commit", ctr, reference)
    finally:
        buildah("rm", ctr)
    _record(reference, time.monotonic() - started)
    return reference


def pause_image() -> str:
    """registry.k8s.io/pause:<its version>, as containerd's sandbox_image expects, built from the
    k8s.io/kubernetes module's build/pause/linux/pause.c (build_cluster.sh)."""
    comp = binaries.component("pause")
    pause_version = (Path(comp["dir"]) / "version").read_text().strip()
    return _single_binary(
        f"registry.k8s.io/pause:{pause_version}", binaries.find_binary("pause"), ["/pause"], "65535:65535"
    )


def coredns_image() -> str:
    version = binaries.version("coredns")
    return _single_binary(f"{REGISTRY}/coredns:{version}", binaries.find_binary("coredns"), ["/coredns"])


OCI_DIR = IMAGES_DIR / "oci"
"""One OCI layout that every image is pushed to, uncompressed: a layer already there is not written
again, so pushing an image whose code changed writes only its new layers."""


def _layout_key(reference: str) -> str:
    return reference.replace("/", "_").replace(":", "_")


def export(reference: str) -> dict:
    """Push the image into the shared OCI layout (new layers only); its manifest descriptor."""
    key = _layout_key(reference)
    index = OCI_DIR / "index.json"
    if not _find(index, key):
        buildah("push", "--disable-compression", "--remove-signatures", reference, f"oci:{OCI_DIR}:{key}")
    found = _find(index, key)
    if found is None:
        raise RuntimeError(f"{reference} is not in {OCI_DIR} after buildah push")
    return found


def _find(index: Path, key: str) -> dict | None:
    try:
        manifests = json.loads(index.read_text())["manifests"]
    except (OSError, ValueError, KeyError):
        return None
    for desc in manifests:
        if (desc.get("annotations") or {}).get("org.opencontainers.image.ref.name") == key:
            return desc
    return None


def blob(digest: str) -> Path:
    algo, hexdigest = digest.split(":", 1)
    return OCI_DIR / "blobs" / algo / hexdigest


def blobs_of(manifest_desc: dict) -> tuple[list[str], list[str]]:
    """(the manifest's and config's digests, the layers' digests)."""
    manifest = json.loads(blob(manifest_desc["digest"]).read_text())
    layers = [layer["digest"] for layer in manifest["layers"]]
    return [manifest_desc["digest"], manifest["config"]["digest"]], layers


def chain_ids(manifest_desc: dict) -> list[str]:
    """The layers' chain IDs (OCI image spec: ChainID(n) = sha256(ChainID(n-1) + " " + DiffID(n))),
    the names containerd gives the snapshots they unpack to."""
    meta, _ = blobs_of(manifest_desc)
    diff_ids = json.loads(blob(meta[1]).read_text())["rootfs"]["diff_ids"]
    chain: list[str] = []
    for diff in diff_ids:
        link = f"{chain[-1]} {diff}".encode() if chain else None
        chain.append("sha256:" + hashlib.sha256(link).hexdigest() if link else diff)
    return chain


def missing_layers(manifest_desc: dict, snapshots: set[str]) -> list[str]:
    """The layers a node must be sent: from the first whose snapshot it lacks to the top (containerd
    unpacks a layer onto its parent's snapshot and skips every layer whose snapshot exists)."""
    _, layers = blobs_of(manifest_desc)
    for i, chain in enumerate(chain_ids(manifest_desc)):
        if chain not in snapshots:
            return layers[i:]
    return []


def write_import_stream(out: object, reference: str, manifest_desc: dict, layers: list[str]) -> int:
    """An OCI archive for `ctr images import` holding the manifest, the config and `layers` (those
    the node has not unpacked yet: a changed image costs its new layers only). Returns the bytes of
    layers sent."""
    import io
    import tarfile

    meta, _ = blobs_of(manifest_desc)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                **{k: v for k, v in manifest_desc.items() if k != "annotations"},
                "annotations": {"io.containerd.image.name": reference},
            }
        ],
    }
    sent = 0
    with tarfile.open(fileobj=out, mode="w|") as tar:  # type: ignore[call-overload]
        for name, data in (
            ("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
            ("index.json", json.dumps(index).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for digest in meta + layers:
            path = blob(digest)
            tar.add(str(path), arcname=f"blobs/{digest.replace(':', '/')}")
            if digest not in meta:
                sent += path.stat().st_size
    return sent


def prune_layout(keep: set[str]) -> None:
    """Drop from the shared layout the older tags of the images in `keep` (references; images of
    other repositories stay) and the blobs only they used."""
    index_path = OCI_DIR / "index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        return
    keys = {_layout_key(r) for r in keep}
    repos = {_layout_key(r.rsplit(":", 1)[0]) + "_" for r in keep}

    def stays(desc: dict) -> bool:
        key = (desc.get("annotations") or {}).get("org.opencontainers.image.ref.name", "")
        return key in keys or not any(key.startswith(repo) and "_" not in key[len(repo) :] for repo in repos)

    kept = [d for d in index["manifests"] if stays(d)]
    used: set[str] = set()
    for desc in kept:
        meta, layers = blobs_of(desc)
        used |= set(meta) | set(layers)
    index["manifests"] = kept
    index_path.write_text(json.dumps(index))
    for path in (OCI_DIR / "blobs" / "sha256").glob("*"):
        if f"sha256:{path.name}" not in used:
            path.unlink(missing_ok=True)
