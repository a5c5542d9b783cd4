"""The test cluster's image plumbing that needs no buildah: the shared OCI layout's pruning."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from forgeline_operator.dev.cluster import images


def _blob(root: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}"


def _image(root: Path, key: str, layers: list[bytes]) -> dict:
    config = _blob(root, json.dumps({"rootfs": {"diff_ids": []}, "key": key}).encode())
    manifest = {"config": {"digest": config}, "layers": [{"digest": _blob(root, x)} for x in layers]}
    digest = _blob(root, json.dumps(manifest).encode())
    return {"digest": digest, "annotations": {"org.opencontainers.image.ref.name": key}}


def test_pruning_drops_older_tags_of_the_kept_images_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading the system images first must not drop the trainer image exported by `make images`
    (it did: the next load pushed all 6.7 GB again); an older trainer tag and its own layers go."""
    monkeypatch.setattr(images, "OCI_DIR", tmp_path)
    old = _image(tmp_path, "forgeline.local_trainer_aaa", [b"base", b"old code"])
    new = _image(tmp_path, "forgeline.local_trainer_bbb", [b"base", b"new code"])
    other = _image(tmp_path, "forgeline.local_trainer-gpu_ccc", [b"gpu"])
    pause = _image(tmp_path, "registry.k8s.io_pause_3.10.1", [b"pause"])
    (tmp_path / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "manifests": [old, new, other, pause]})
    )

    images.prune_layout(keep={"registry.k8s.io/pause:3.10.1"})
    assert len(json.loads((tmp_path / "index.json").read_text())["manifests"]) == 4

    images.prune_layout(keep={"forgeline.local/trainer:bbb"})
    left = [
        d["annotations"]["org.opencontainers.image.ref.name"]
        for d in json.loads((tmp_path / "index.json").read_text())["manifests"]
    ]
    assert left == [
        "forgeline.local_trainer_bbb",
        "forgeline.local_trainer-gpu_ccc",
        "registry.k8s.io_pause_3.10.1",
    ]
    assert images.blob(new["digest"]).exists()
    names = {p.name for p in (tmp_path / "blobs" / "sha256").iterdir()}
    assert (
        hashlib.sha256(b"base").hexdigest() in names and hashlib.sha256(b"old code").hexdigest() not in names
    )
