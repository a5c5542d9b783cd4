"""Where things live: turn spec URIs into paths or fsspec URLs, and copy directories to them.

- `s3://…`, `gs://…`      object stores, through fsspec (s3fs / gcsfs in the image);
- `pvc://claim/path`      the PersistentVolumeClaim the operator mounts at $FORGELINE_PVC_ROOT/claim
                          (default /mnt/pvc), so `/mnt/pvc/claim/path` inside the pods;
- `file:///abs`, `/abs`   local (or shared-filesystem) paths;
- `relative/path`         relative to the job's workDir (local runs), else $FORGELINE_WORK_DIR (the
                          trainer image's working directory, which holds examples/data: Ray runs
                          each job in a directory of its own), else the current directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import fsspec

from forgeline_operator.api.inputs import local_path

from .errors import DataNotFound

REMOTE_SCHEMES = ("s3://", "gs://")


def resolve(uri: str, work_dir: str | None = None) -> str:
    """A local absolute path, or an fsspec URL for object stores (the same resolution the input
    check before a run uses: forgeline_operator.api.inputs.local_path)."""
    return local_path(uri, work_dir) or uri


def is_remote(location: str) -> bool:
    return location.startswith(REMOTE_SCHEMES)


def expand(location: str) -> list[str]:
    """A file, every file in a directory, or every match of a glob; sorted, so order is stable."""
    fs, _, _ = fsspec.get_fs_token_paths(location)
    if any(ch in location for ch in "*?["):
        matches = sorted(fs.glob(location))
    elif fs.isdir(location):
        matches = sorted(p for p in fs.find(location) if not Path(p).name.startswith("."))
    elif fs.exists(location):
        matches = [location]
    else:
        matches = []
    if not matches:
        raise DataNotFound(f"no data at {location}")
    protocol = location.split("://", 1)[0] + "://" if is_remote(location) else ""
    return [m if m.startswith(protocol) else protocol + m for m in matches]


def open_file(location: str, mode: str = "rb"):  # noqa: ANN201 - a file object
    return fsspec.open(location, mode).open()


def publish_dir(local_dir: str | Path, location: str) -> None:
    """Copy a finished local directory to its destination (object store or path)."""
    if is_remote(location):
        fs, _, (root,) = fsspec.get_fs_token_paths(location)
        fs.put(str(local_dir), root, recursive=True)
        return
    dest = Path(location)
    if Path(local_dir).resolve() == dest.resolve():
        return
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(local_dir, dest, dirs_exist_ok=True, copy_function=shutil.copyfile)
    _default_modes(dest)


def _default_modes(root: Path) -> None:
    """Modes as the process's umask gives new files (copytree copies the private 0700 of the
    temporary directory, and some writers make 0600 files): a serving pod or a person with another
    UID in the volume's group can then read the model."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def local_copy(location: str, cache_root: str | Path) -> str:
    """A local directory with the contents of `location` (downloads object-store models once)."""
    if not is_remote(location):
        return location
    target = Path(cache_root) / location.replace("://", "/").strip("/")
    if not (target / ".complete").exists():
        fs, _, (root,) = fsspec.get_fs_token_paths(location)
        target.mkdir(parents=True, exist_ok=True)
        fs.get(root.rstrip("/") + "/", str(target), recursive=True)
        (target / ".complete").touch()
    return str(target)
