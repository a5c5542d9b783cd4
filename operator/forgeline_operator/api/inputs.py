"""What can be known about a job's inputs before anything starts, checked in seconds where the job
will read them: on this machine for `forgeline run` (before an embedded Ray head is started), in
the Ray driver on a cluster (the head pod mounts the same volumes as the workers).

    data sources       exist and can be read (a glob matches a file)           DataError
    base / reward model, adapters, tokenizer
                       a save_pretrained directory (config.json, adapter_config.json, tokenizer
                       files), or a hub id that is cached or answers within HUB_TIMEOUT_S
                       (HF_HUB_OFFLINE honoured; a gated or private id without HF_TOKEN named)
                                                                                ModelUnavailable
    output, checkpoints
                       the nearest existing directory can be written           StorageError

Object-store URIs are left to the trainer (it reads them with the job's credentials). Each
problem is one line with its typed reason and fix (`one_line`), the same line `forgeline run`
prints and the operator writes to status.message, lastFailure and the Event. Stdlib and
huggingface_hub only: the operator and the trainer both call it.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .jobconfig import FineTuneJobConfig, TrainingJobConfig

HUB_TIMEOUT_S = 3.0
"""How long the hub (HF_ENDPOINT, default https://huggingface.co) gets to answer for one model id."""

InputReason = Literal["DataError", "ModelUnavailable", "StorageError"]
_REMOTE = ("s3://", "gs://", "gcs://", "az://", "abfs://", "http://", "https://")
_GLOB = set("*?[")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def one_line(reason: str, message: str, fix: str) -> str:
    """The one line a job that cannot run says: in `forgeline run`, status.message and the Event."""
    return f"{reason}: {message}" + (f" — fix: {fix}" if fix else "")


@dataclass(frozen=True)
class InputProblem:
    reason: InputReason
    field: str
    """The spec field that names the input, e.g. `spec.data.sources[0].uri`."""
    message: str
    fix: str

    def line(self) -> str:
        return one_line(self.reason, f"{self.field}: {self.message}", self.fix)


def local_path(uri: str, work_dir: str | None, env: Mapping[str, str] = os.environ) -> str | None:
    """The path this machine reads for `uri` (pvc://claim/dir under FORGELINE_PVC_ROOT, as the Ray
    pods mount it; relative paths under the work directory); None for object stores and hub ids."""
    if uri.startswith(_REMOTE) or uri.startswith("hf://"):
        return None
    if uri.startswith("pvc://"):
        return str(Path(env.get("FORGELINE_PVC_ROOT", "/mnt/pvc")) / uri[len("pvc://") :])
    if uri.startswith("file://"):
        return uri[len("file://") :]
    path = Path(uri).expanduser()
    if not path.is_absolute():
        path = Path(work_dir or env.get("FORGELINE_WORK_DIR") or os.getcwd()) / path
    return str(path)


def check(
    config: TrainingJobConfig | FineTuneJobConfig,
    *,
    hub_timeout: float = HUB_TIMEOUT_S,
    env: Mapping[str, str] = os.environ,
    skip: frozenset[str] = frozenset(),
) -> list[InputProblem]:
    """Every problem with the job's inputs that can be seen before it starts. `skip`: resolved
    locations not to check (a pipeline's earlier stage writes them)."""
    work = config.paths.work_dir
    out: list[InputProblem] = []
    for field, uri in _data_sources(config):
        out += _data(field, uri, work, env)
    for field, location, kind in _models(config):
        if location and location not in skip:
            out += _model(field, location, kind, work, env, hub_timeout)
    output = _writable("spec.output.uri", config.paths.output, work, env)
    inside = config.paths.checkpoints.startswith(config.paths.output.rstrip("/") + "/")
    checkpoints = [] if output and inside else _writable("checkpoints", config.paths.checkpoints, work, env)
    return out + output + checkpoints  # checkpoints under an output that cannot be made: said once


# -- what the job reads ----------------------------------------------------------------------------


def _data_sources(config: TrainingJobConfig | FineTuneJobConfig) -> list[tuple[str, str]]:
    spec = config.spec
    if isinstance(config, TrainingJobConfig):
        train = [(f"spec.data.sources[{i}].uri", s.uri) for i, s in enumerate(spec.data.sources)]
    else:
        ds = config.spec.dataset
        train = [(f"spec.dataset.sources[{i}].uri", s.uri) for i, s in enumerate(ds.sources)] if ds else []
    held_out = [(f"spec.evaluation.sources[{i}].uri", s.uri) for i, s in enumerate(spec.evaluation.sources)]
    return train + held_out


def _models(config: TrainingJobConfig | FineTuneJobConfig) -> list[tuple[str, str | None, str]]:
    """(field, resolved location, what it must hold) of every model-like input."""
    paths = config.paths
    if isinstance(config, TrainingJobConfig):
        tok = config.spec.data.tokenizer
        tokenizer = tok.path or (f"hf://{tok.hub_id}" if tok.hub_id else None)
        field = "spec.data.tokenizer.path" if tok.path else "spec.data.tokenizer.hubId"
        return [("spec.model.initFrom", paths.base_model, "model"), (field, tokenizer, "tokenizer")]
    out = [
        ("spec.baseModel", paths.base_model, "model+tokenizer"),  # a fine-tune's tokenizer comes from it
        ("spec.rl.rewardModel", paths.reward_model, "model"),
    ]
    out += [(f"spec.merge.adapters[{i}]", a, "adapter") for i, a in enumerate(paths.adapters)]
    return out


def _data(field: str, uri: str, work: str | None, env: Mapping[str, str]) -> list[InputProblem]:
    path = local_path(uri, work, env)
    if path is None:
        return []
    fix = "give a path that exists where the job runs (relative paths are under its work directory)"
    if _GLOB & set(path):
        if not glob.glob(path, recursive=True):
            return [InputProblem("DataError", field, f"no file matches {path}", fix)]
        return []
    if not os.path.exists(path):
        return [InputProblem("DataError", field, f"no data at {path}", fix)]
    if not os.access(path, os.R_OK):
        return [InputProblem("DataError", field, f"{path} cannot be read", "make it readable by the trainer")]
    return []


def _model(
    field: str, location: str, kind: str, work: str | None, env: Mapping[str, str], hub_timeout: float
) -> list[InputProblem]:
    if location.startswith("hf://"):
        return _hub(field, location[len("hf://") :], kind, env, hub_timeout)
    path = local_path(location, work, env)
    if path is None:
        return []
    fix = f"point {field} at a save_pretrained directory that exists where the job runs"
    what = kind.split("+")[0]
    if not os.path.isdir(path):
        return [InputProblem("ModelUnavailable", field, f"{what} directory {path} does not exist", fix)]
    needs = {
        "model": [("config.json",)],
        "model+tokenizer": [("config.json",), _TOKENIZER_FILES],
        "adapter": [("adapter_config.json",)],
        "tokenizer": [_TOKENIZER_FILES],
    }[kind]
    for need in needs:
        if not any(os.path.isfile(os.path.join(path, name)) for name in need):
            saved = "tokenizer" if need is _TOKENIZER_FILES else what
            message = f"{path} has no {' or '.join(need)}: it is not a saved {saved}"
            if saved != what:
                message += f" (the fine-tune loads its tokenizer from {field})"
            return [InputProblem("ModelUnavailable", field, message, fix)]
    return []


def _hub(field: str, repo: str, kind: str, env: Mapping[str, str], timeout: float) -> list[InputProblem]:
    """A hub id: cached (then nothing is fetched), or asked for its config within `timeout`."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    filename = {"adapter": "adapter_config.json", "tokenizer": "tokenizer_config.json"}.get(
        kind, "config.json"
    )
    if isinstance(try_to_load_from_cache(repo, filename), str):
        return []
    offline = str(env.get("HF_HUB_OFFLINE", "")).lower() in ("1", "true", "yes", "on")
    local = f"or point {field.replace('hubId', 'path')} at a save_pretrained directory"
    if offline:
        message = f"hub id {repo} is not in this machine's Hugging Face cache and HF_HUB_OFFLINE is set"
        return [
            InputProblem(
                "ModelUnavailable", field, message, f"download it first (hf download {repo}), {local}"
            )
        ]
    endpoint = env.get("HF_ENDPOINT") or constants.ENDPOINT
    token = env.get("HF_TOKEN") or None
    try:
        get_hf_file_metadata(
            hf_hub_url(repo, filename, endpoint=endpoint), token=token or False, timeout=timeout
        )
    except (GatedRepoError, RepositoryNotFoundError) as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if token is None and (isinstance(exc, GatedRepoError) or status in (401, 403)):
            what = "is gated" if isinstance(exc, GatedRepoError) else "is private or does not exist"
            message = f"hub id {repo} {what} and HF_TOKEN is not set"
            return [
                InputProblem("ModelUnavailable", field, message, f"export HF_TOKEN with access to {repo}")
            ]
        message = f"hub id {repo} does not exist at {endpoint} (or this token cannot see it)"
        return [InputProblem("ModelUnavailable", field, message, f"check the id's spelling, {local}")]
    except HfHubHTTPError as exc:
        message = f"hub id {repo}: {endpoint} answered {exc}".splitlines()[0]
        return [InputProblem("ModelUnavailable", field, message, f"retry later, {local}")]
    except Exception as exc:
        if not _unreachable(exc):
            raise
        message = f"cannot reach {endpoint} within {timeout:g}s for hub id {repo} ({type(exc).__name__})"
        fix = (
            f"set HF_ENDPOINT to a reachable hub mirror, or fill the cache and set HF_HUB_OFFLINE=1, {local}"
        )
        return [InputProblem("ModelUnavailable", field, message, fix)]
    return []


def _unreachable(exc: BaseException) -> bool:
    """No answer from the hub: a refused, unrouted or timed-out connection (huggingface_hub's
    HTTP client raises its own TransportError, not an OSError)."""
    return isinstance(exc, OSError) or any(c.__name__ == "TransportError" for c in type(exc).__mro__)


def _writable(field: str, uri: str, work: str | None, env: Mapping[str, str]) -> list[InputProblem]:
    """The location, or its nearest existing parent (the trainer makes the rest), can be written."""
    path = local_path(uri, work, env)
    if path is None:
        return []
    at = Path(path)
    while not at.exists() and at != at.parent:
        at = at.parent
    if at.is_dir() and os.access(at, os.W_OK | os.X_OK):
        return []
    what = "is not a directory" if not at.is_dir() else "cannot be written"
    message = f"{path} cannot be made: {at} {what}" if str(at) != path else f"{path} {what}"
    if field == "checkpoints":
        field = "spec.checkpointing.storage"
    return [
        InputProblem("StorageError", field, message, f"point {field} at a location the trainer can write")
    ]
