"""Where a job may write: an operator's storage prefixes (FORGELINE_STORAGE_PREFIXES), checked on
the normalised location, so `..`, doubled slashes and look-alike names never get a job's output,
checkpoints or archived logs outside them.

    s3://team-a/runs/../../other   →  s3://other        (outside s3://team-a/)
    s3://team-a-evil/x             →  outside s3://team-a (prefixes end at a path boundary)
    runs/../../etc                 →  <work dir>/../../etc, normalised, then compared
"""

from __future__ import annotations

import posixpath

_SCHEMES = ("s3://", "gs://", "pvc://")


def normalize(uri: str, work_dir: str | None = None) -> str:
    """`uri` with `.` and `..` resolved lexically (never above the bucket, claim or root) and
    relative paths put under `work_dir` (when known)."""
    for scheme in _SCHEMES:
        if uri.startswith(scheme):
            return scheme + posixpath.normpath("/" + uri[len(scheme) :]).lstrip("/")
    path = uri.removeprefix("file://")
    if not path.startswith("/") and work_dir:
        path = posixpath.join(work_dir, path)
    normal = posixpath.normpath(path)
    return "/" + normal.lstrip("/") if normal.startswith("/") else normal


def within(uri: str, prefix: str, work_dir: str | None = None) -> bool:
    """Whether `uri` lies in `prefix` (both normalised; the prefix ends at a path boundary)."""
    location, root = normalize(uri, work_dir), normalize(prefix, work_dir).rstrip("/")
    if root.endswith(":/"):  # a whole scheme, e.g. s3://
        return location.startswith(root + "/")
    return location == root or location.startswith(root + "/")


def outside(uri: str, prefixes: list[str], work_dir: str | None = None) -> str | None:
    """None where `uri` may be written (no prefixes configured, or inside one); else the
    normalised location, for the error message."""
    if not prefixes or any(within(uri, p, work_dir) for p in prefixes):
        return None
    return normalize(uri, work_dir)
