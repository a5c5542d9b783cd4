"""Each attempt's Ray job log, kept after its Ray cluster is gone (`forgeline logs` reads it).

The operator rewrites `attempt-<N>.log` — the last FORGELINE_LOG_ARCHIVE_BYTES of the attempt's
Ray job log (10 MiB by default) — whenever that log has grown, at every reconcile: the archive
trails the live log by one reconcile interval, so a head that dies mid-run leaves its log up to
then, and rewriting (not appending) keeps it whole across operator restarts.

Where it goes, in this order:
- FORGELINE_LOG_ARCHIVE (a path, or an s3:// / gs:// prefix) + `/<namespace>/<kind>/<name>/`;
- else next to the job's checkpoints, `<checkpointUri>/logs/`, where the operator can reach
  them: object stores (with the operator's own credentials, e.g. its ServiceAccount's IAM role)
  and, for the local and address backends, paths on this machine (relative ones under the
  operator's work directory);
- else nowhere: pvc:// and pod-local paths of KubeRay clusters are not the operator's to write
  (set FORGELINE_LOG_ARCHIVE, or mount the claim into the operator and point it there).
"""

from __future__ import annotations

from pathlib import Path

REMOTE = ("s3://", "gs://")


def location(
    attempt: int,
    job: tuple[str, str, str],
    checkpoint_uri: str | None,
    archive_root: str | None,
    work_dir: str | None,
    local_paths: bool,
) -> str | None:
    """Where attempt `attempt` of `job` (namespace, kind, name) is archived, or None."""
    name = f"attempt-{attempt}.log"
    if archive_root:
        namespace, kind, job_name = job
        return f"{_local(archive_root, work_dir).rstrip('/')}/{namespace}/{kind.lower()}/{job_name}/{name}"
    if not checkpoint_uri:
        return None
    if checkpoint_uri.startswith(REMOTE):
        return f"{checkpoint_uri.rstrip('/')}/logs/{name}"
    if checkpoint_uri.startswith("pvc://") or not local_paths:
        return None
    return f"{_local(checkpoint_uri, work_dir).rstrip('/')}/logs/{name}"


def _local(uri: str, work_dir: str | None) -> str:
    if uri.startswith(REMOTE):
        return uri
    path = Path(uri.removeprefix("file://")).expanduser()
    if not path.is_absolute() and work_dir:
        path = Path(work_dir) / path
    return str(path)


def tail(text: str, limit_bytes: int) -> str:
    """The end of `text` within `limit_bytes` (UTF-8), from a line start where there is one."""
    data = text.encode()
    if len(data) <= limit_bytes:
        return text
    cut = data[-limit_bytes:].decode(errors="ignore")
    newline = cut.find("\n")
    kept = cut[newline + 1 :] if 0 <= newline < len(cut) - 1 else cut
    return f"[... {len(data) - len(kept.encode())} earlier bytes not archived ...]\n{kept}"


def write(uri: str, text: str, limit_bytes: int) -> None:
    """(Re)write the archive at `uri` with the end of `text`; OSError when it cannot be written."""
    import fsspec

    body = tail(text, limit_bytes)
    if not uri.startswith(REMOTE):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{uri}.tmp")
        tmp.write_text(body)
        tmp.replace(uri)  # readers never see half a file
        return
    with fsspec.open(uri, "w") as f:
        f.write(body)


def read(uri: str) -> str:
    import fsspec

    with fsspec.open(uri, "r") as f:
        return f.read()
