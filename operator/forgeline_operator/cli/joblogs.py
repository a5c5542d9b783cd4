"""`forgeline logs NAME [-n NS] [--attempt N]`: a job's Ray job log, whether its cluster is alive
or not.

It reads the job's status.logs (written by the operator's log archive, see controller/logarchive.py) and
prints the attempt's archived log; where there is no archive yet but the attempt is the current
one and its Ray head answers, it asks Ray for the live log instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ..api import API_GROUP, API_VERSION
from ..controller.logarchive import read
from ..rayclient.rayjobs import RayJobs

_PLURALS = {"trainingjob": "trainingjobs", "finetunejob": "finetunejobs"}


class LogsError(RuntimeError):
    """Why there is no log to print, with what to do."""


def fetch_job(args: argparse.Namespace) -> dict[str, Any]:
    """The job named in `args` (either kind unless --kind), as the apiserver has it."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    api = client.CustomObjectsApi(config.new_client_from_config(config_file=args.kubeconfig))
    kinds = [args.kind] if args.kind else list(_PLURALS)
    for kind in kinds:
        try:
            return api.get_namespaced_custom_object(
                API_GROUP, API_VERSION, args.namespace, _PLURALS[kind], args.name
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
    raise LogsError(f"no {' or '.join(kinds)} {args.name!r} in namespace {args.namespace!r}")


def fetch_related(args: argparse.Namespace) -> Callable[[str, str], dict[str, Any] | None]:
    """A lookup of other jobs (kind, name) the way `args` names this one; None for one not there."""

    def fetch(kind: str, name: str) -> dict[str, Any] | None:
        try:
            return fetch_job(argparse.Namespace(**{**vars(args), "kind": kind.lower(), "name": name}))
        except LogsError:
            return None

    return fetch


def _entry(status: dict[str, Any], attempt: int | None, name: str) -> dict[str, Any] | None:
    entries = {int(e["attempt"]): e for e in status.get("logs") or []}
    if attempt is None:
        return entries[max(entries)] if entries else None
    if attempt not in entries and entries:
        have = sorted(entries)
        raise LogsError(f"{name} has no archived log for attempt {attempt}; it has attempts {have}")
    return entries.get(attempt)


def _live(status: dict[str, Any], attempt: int | None, token: str | None) -> str | None:
    """The current attempt's log from Ray, when it answers."""
    ray = status.get("ray") or {}
    current = int(status.get("restarts") or 0) + int(status.get("preemptions") or 0)
    if not ray.get("address") or not ray.get("jobId") or attempt not in (None, current):
        return None
    try:
        return RayJobs(ray["address"], token=token, request_timeout=10).logs(ray["jobId"])
    except (ConnectionError, RuntimeError):
        return None


def logs(args: argparse.Namespace) -> str:
    status = fetch_job(args).get("status") or {}
    entry = _entry(status, args.attempt, args.name)
    if entry is not None:
        try:
            return read(entry["uri"])
        except OSError as exc:
            live = _live(status, args.attempt, args.token)
            if live is not None:
                return live
            raise LogsError(f"the archived log at {entry['uri']} cannot be read here: {exc}") from None
    live = _live(status, args.attempt, args.token)
    if live is not None:
        return live
    raise LogsError(
        f"{args.name} has no archived log yet (status.logs is empty) and no live Ray job to ask: "
        "the operator archives a log once the attempt has printed something (see FORGELINE_LOG_ARCHIVE)"
    )


def main(args: argparse.Namespace) -> int:
    try:
        text = logs(args)
    except LogsError as exc:
        print(f"forgeline logs: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    return 0
