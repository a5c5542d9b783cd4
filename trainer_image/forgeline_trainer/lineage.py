"""Lineage: where an output came from, written next to the model.

    lineage.json   the record: the job, the resolved config's hash, the base model (and reward
                   model, adapters) with their content digests, each data source with the digest
                   of the bytes actually read, the trainer image, the versions of Forgeline, torch,
                   transformers and Ray, the seed, the evals before and after with their sizes and
                   intervals, the promotion verdict, the attempt's goodput ledger, and — where a
                   model came from another Forgeline job — that job's own record, nested (a DPO
                   model's record reaches back through its SFT to the pretraining)
    README.md      the same as a Hugging Face model card (huggingface_hub's ModelCard, with the
                   evals as `model-index` results), so a `save_pretrained` output describes itself

The driver reads the data and the models (`data.read_records` calls `note_read`; `driver_inputs`
digests the models), hands its findings to the workers in the train loop's config, and rank 0
writes both files when it publishes (`outputs.publish`). The `done` progress record carries a
summary (`summary`) that the operator keeps in status.lineage.
"""

from __future__ import annotations

import hashlib
import json
import platform
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from forgeline_operator.api.jobconfig import FineTuneJobConfig, TrainingJobConfig, dump_job_config

from . import storage

LINEAGE_FILE = "lineage.json"
CARD_FILE = "README.md"
SCHEMA = "forgeline.dev/lineage/v1"
_CHUNK = 1 << 20

_lock = threading.Lock()
_reads: dict[str, dict[str, Any]] = {}
"""Data source URI → a running digest of the bytes read from it (the driver's reads)."""
INPUTS: dict[str, Any] = {}
"""In a worker: what the driver found (`driver_inputs`), set by the launcher's worker entry."""


def note_read(uri: str, path: str, raw: bytes) -> None:
    """Record one file read for data source `uri` (a file read twice counts once)."""
    with _lock:
        files = _reads.setdefault(uri, {"files": {}})["files"]
        files[str(path)] = (hashlib.sha256(raw).hexdigest(), len(raw))


def note_dataset(uri: str, fingerprint: str, rows: int) -> None:
    """A saved `datasets` dataset: its own content fingerprint stands for the bytes."""
    with _lock:
        _reads[uri] = {"files": {}, "fingerprint": fingerprint, "rows": rows}


def data_reads() -> list[dict[str, Any]]:
    """Every data source read so far: sha256 over its files' names and sha256s (sorted), the
    number of files and bytes."""
    out = []
    with _lock:
        for uri, entry in _reads.items():
            files = entry["files"]
            lines = "".join(f"{Path(p).name} {sha}\n" for p, (sha, _) in sorted(files.items()))
            row: dict[str, Any] = {
                "uri": uri,
                "sha256": hashlib.sha256(lines.encode()).hexdigest() if files else None,
                "files": len(files),
                "bytes": sum(size for _, size in files.values()),
            }
            if "fingerprint" in entry:
                row["datasetFingerprint"] = entry["fingerprint"]
                row["rows"] = entry["rows"]
            out.append({k: v for k, v in row.items() if v is not None})
    return out


def digest_dir(path: Path, skip: frozenset[str] = frozenset({LINEAGE_FILE, CARD_FILE})) -> dict[str, Any]:
    """The content digest of a directory: sha256 over each file's relative path and sha256, sorted
    (the lineage record and model card left out: they describe the rest; and `checkpoints/`, where
    a job keeps its checkpoints by default: they are not the model)."""
    lines, total, files = [], 0, 0
    for p in sorted(x for x in path.rglob("*") if x.is_file()):
        rel = p.relative_to(path).as_posix()
        if rel in skip or rel.startswith("checkpoints/"):
            continue
        h = hashlib.sha256()
        with p.open("rb") as f:
            for chunk in iter(lambda f=f: f.read(_CHUNK), b""):
                h.update(chunk)
        lines.append(f"{rel} {h.hexdigest()}\n")
        total += p.stat().st_size
        files += 1
    return {"sha256": hashlib.sha256("".join(lines).encode()).hexdigest(), "files": files, "bytes": total}


def model_origin(location: str | None, work_dir: str | None) -> dict[str, Any] | None:
    """A model's location and content digest; a Forgeline output's own record (its lineage.json)
    is taken as it is, digest and all, and nested as `upstream`."""
    if not location:
        return None
    if location.startswith("hf://"):
        return {"location": location, "digest": None, "note": "a hub id: the hub's revision names it"}
    local = Path(storage.resolve(location, work_dir))
    if not local.exists():
        return {"location": location, "digest": None, "note": "not on a local or mounted path: not digested"}
    record = local / LINEAGE_FILE
    if record.is_file():
        try:
            upstream = json.loads(record.read_text())
            return {"location": location, "digest": upstream["output"]["digest"], "upstream": upstream}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not a record this code wrote: digest the files
    return {"location": location, "digest": digest_dir(local)}


def driver_inputs(cfg: TrainingJobConfig | FineTuneJobConfig) -> dict[str, Any]:
    """On the driver, after the data is read: the data digests and the models' origins."""
    paths = cfg.paths
    return {
        "data": data_reads(),
        "baseModel": model_origin(paths.base_model, paths.work_dir),
        "rewardModel": model_origin(paths.reward_model, paths.work_dir),
        "adapters": [model_origin(a, paths.work_dir) for a in paths.adapters],
    }


def config_digest(cfg: TrainingJobConfig | FineTuneJobConfig) -> str:
    """sha256 of the resolved job config without its run settings (which attempt, which Ray run):
    the same for every attempt of a job, different for any change to what it trains."""
    wire = json.loads(dump_job_config(cfg))
    wire.pop("run", None)
    return hashlib.sha256(json.dumps(wire, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def versions() -> dict[str, str]:
    """Forgeline's and the training stack's versions."""
    import ray
    import torch
    import transformers

    from . import __version__

    out = {
        "forgeline": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
    }
    for name in ("peft", "trl", "deepspeed", "datasets"):
        try:
            module = __import__(name)
        except Exception:  # noqa: BLE001 - an optional part of the stack
            continue
        out[name] = getattr(module, "__version__", "?")
    return out


def record(
    cfg: TrainingJobConfig | FineTuneJobConfig,
    summary: Mapping[str, Any],
    output_digest: dict[str, Any],
    inputs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The lineage record of an output (`summary`: the run's metrics.json)."""
    inputs = dict(INPUTS if inputs is None else inputs)
    image = cfg.run.trainer_image
    spec = cfg.spec
    what = getattr(spec, "method", None) or getattr(spec, "objective", None)
    rec = {
        "schema": SCHEMA,
        "job": {"kind": cfg.kind, "name": cfg.name, "namespace": cfg.namespace, "method": what},
        "createdAt": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "output": {"uri": cfg.paths.output, "digest": output_digest},
        "config": {"sha256": config_digest(cfg), "attempt": cfg.run.attempt},
        "trainerImage": {
            "image": image,
            "digest": image.split("@", 1)[1] if image and "@sha256:" in image else None,
            "note": None if image else "not run from a Forgeline image (forgeline run on this machine)",
        },
        "versions": versions(),
        "seed": spec.training.seed,
        "training": {"optimizer": summary.get("optimizer"), "precision": summary.get("precision")},
        "inputs": {k: v for k, v in inputs.items() if v not in (None, [])},
        "evals": {"before": summary.get("initial_eval"), "after": summary.get("final_eval")},
        "promotion": summary.get("promotion"),
        "goodputLedger": summary.get("goodput_ledger"),
        "steps": summary.get("steps"),
    }
    return _drop_none(rec)


def digest(rec: Mapping[str, Any]) -> str:
    """sha256 of a record's canonical JSON (what status.lineage.digest and MLflow's tag name)."""
    return hashlib.sha256(json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def chain(rec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The record and its upstream records, following the base model back: newest first."""
    out: list[Mapping[str, Any]] = []
    node: Mapping[str, Any] | None = rec
    while node is not None and len(out) < 64:
        out.append(node)
        node = ((node.get("inputs") or {}).get("baseModel") or {}).get("upstream")
    return out


def summary(rec: Mapping[str, Any]) -> dict[str, Any]:
    """What status.lineage keeps of a record (the `done` progress record carries it)."""
    inputs = rec.get("inputs") or {}
    base = inputs.get("baseModel") or {}

    def short(origin: Mapping[str, Any] | None) -> dict[str, Any] | None:
        if not origin:
            return None
        d = origin.get("digest")
        return _drop_none(
            {"location": origin.get("location"), "sha256": d.get("sha256") if isinstance(d, dict) else None}
        )

    upstream = [
        {"job": f"{u['job']['kind']}/{u['job']['name']}", "digest": digest(u)} for u in chain(rec)[1:]
    ]
    return _drop_none(
        {
            "digest": digest(rec),
            "file": LINEAGE_FILE,
            "outputSha256": (rec.get("output") or {}).get("digest", {}).get("sha256"),
            "configSha256": (rec.get("config") or {}).get("sha256"),
            "baseModel": short(base),
            "data": [
                {"uri": d["uri"], "sha256": d.get("sha256") or d.get("datasetFingerprint")}
                for d in inputs.get("data") or []
            ],
            "trainerImage": (rec.get("trainerImage") or {}).get("image"),
            "versions": rec.get("versions"),
            "seed": rec.get("seed"),
            "upstream": upstream,
        }
    )


# -- the model card ---------------------------------------------------------------------------

_METRICS = {  # eval key → (model-index metric type, name)
    "eval_loss": ("loss", "held-out loss"),
    "perplexity": ("perplexity", "held-out perplexity"),
    "accuracy": ("accuracy", "held-out next-token accuracy"),
    "preference_accuracy": ("accuracy", "held-out preference accuracy"),
    "reward_margin": ("reward_margin", "held-out reward margin"),
    "mean_reward": ("mean_reward", "mean reward"),
}


def model_card(rec: Mapping[str, Any]) -> str:
    """A Hugging Face model card (README.md) for the output: metadata with `model-index` eval
    results (huggingface_hub's ModelCardData/EvalResult), then the lineage in prose."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    job = rec["job"]
    evals = rec.get("evals") or {}
    after = evals.get("after") or {}
    before = evals.get("before") or {}
    data = (rec.get("inputs") or {}).get("data") or []
    dataset = data[0]["uri"] if data else "held-out data"
    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type="forgeline-holdout",
            dataset_name=f"held-out slice of {dataset}",
            metric_type=_METRICS[key][0],
            metric_name=_METRICS[key][1],
            metric_value=float(after[key]),
        )
        for key in _METRICS
        if isinstance(after.get(key), (int, float))
    ]
    base = ((rec.get("inputs") or {}).get("baseModel") or {}).get("location")
    card_data = ModelCardData(
        model_name=job["name"],
        base_model=base[len("hf://") :] if isinstance(base, str) and base.startswith("hf://") else None,
        library_name="transformers",
        tags=["forgeline", str(job.get("method") or job["kind"])],
        eval_results=results or None,
    )
    rows = "\n".join(
        f"| {key} | {_fmt(before.get(key))} | {_fmt(after.get(key))} | {_fmt(after.get(key + '_ci95'))} |"
        for key in _METRICS
        if key in after
    )
    promo = rec.get("promotion")
    gate = f"**Promotion:** {promo['reason']} — {promo['message']}\n\n" if promo else ""
    ups = "\n".join(
        f"- {u['job']['kind']}/{u['job']['name']} (output {u['output']['digest']['sha256'][:16]}…)"
        for u in chain(rec)[1:]
        if isinstance((u.get("output") or {}).get("digest"), dict)
    )
    text = (
        "---\n" + card_data.to_yaml() + "\n---\n\n"
        f"# {job['name']}\n\n"
        f"Trained by Forgeline ({job['kind']}, {job.get('method') or ''}) in namespace `{job['namespace']}`. "
        f"The full record is in `{LINEAGE_FILE}` next to this card (digest `{digest(rec)[:16]}…`).\n\n"
        f"## Evaluation (held out, {_fmt(after.get('eval_tokens'))} tokens)\n\n"
        "| metric | before training | after | 95% ± |\n|---|---|---|---|\n"
        + (rows or "| (none) | | | |")
        + "\n\n"
        + gate
        + "## Lineage\n\n"
        f"- base model: {base or 'trained from scratch'}\n"
        + "".join(f"- data: {d['uri']} (sha256 {_id(d)[:16]}…, {d.get('bytes', 0):,} bytes)\n" for d in data)
        + f"- config sha256: {rec['config']['sha256'][:16]}…; seed {rec.get('seed')}\n"
        + f"- versions: {', '.join(f'{k} {v}' for k, v in (rec.get('versions') or {}).items())}\n"
        + (f"- upstream jobs:\n{ups}\n" if ups else "")
    )
    return str(ModelCard(text))


def write(out_dir: Path, rec: Mapping[str, Any]) -> None:
    """lineage.json and README.md into the output directory."""
    (out_dir / LINEAGE_FILE).write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")
    (out_dir / CARD_FILE).write_text(model_card(rec))


def _id(data: Mapping[str, Any]) -> str:
    return str(data.get("sha256") or data.get("datasetFingerprint"))


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else ""


def _drop_none(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}
