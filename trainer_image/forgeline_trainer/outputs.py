"""What a finished job leaves at its output URI: the model and tokenizer files, metrics.json (the
run's summary), loss.png and job_config.json — written to a temporary directory and published in
one copy by `publish`, the same for every recipe."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forgeline_operator.api import promotion
from forgeline_operator.api.jobconfig import FineTuneJobConfig, TrainingJobConfig, dump_job_config

from . import lineage, progress, storage
from .errors import storage_writes
from .models import ModelStats
from .runtime import Worker


def summary(
    job: Worker[Any],
    reporter: progress.Reporter,
    stats: ModelStats,
    final_eval: dict[str, float],
    **recipe_fields: Any,
) -> dict[str, Any]:
    """metrics.json: the fields every recipe's summary has (job, size, losses, throughput and MFU
    from the reporter, world size, precision), then the recipe's own `recipe_fields`."""
    last = reporter.last
    losses = [h["loss"] for h in reporter.history]
    baseline = _baseline(reporter.eval_history)
    gate = job.cfg.spec.promotion
    verdict = None if gate is None else promotion.decide(gate, baseline, final_eval).status()
    return {
        "job": job.cfg.name,
        "kind": job.cfg.kind,
        "parameters": stats.parameters,
        "steps": reporter.total_steps,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "initial_eval": baseline,
        "final_eval": final_eval,
        "promotion": verdict,  # spec.promotion's verdict (the operator's Promoted condition says the same)
        "goodput_ledger": reporter.ledger_record(),  # this attempt's seconds by what they went to
        "tokens_per_second": last.get("tokens_per_second"),
        "mfu": last.get("mfu"),
        "mfu_peak_source": reporter.peak_source,
        "wall_seconds": last.get("elapsed_seconds"),
        "world_size": job.rt.world,
        "precision": job.precision,
        "optimizer": job.cfg.spec.optimizer(),
        **peak_memory(),
        **recipe_fields,
    }


def _baseline(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The eval before training: the last record at step 0 (a TRL recipe's own evaluate() is
    recorded first, through the Trainer callback, with TRL's metric names; the recipe's record of
    the same eval follows it)."""
    at_start = [e for e in history if e["step"] == 0]
    return at_start[-1] if at_start else None


def peak_memory() -> dict[str, Any]:
    """This process's peak memory: resident set size (ru_maxrss: Linux reports KiB) and, on a
    GPU, torch's peak allocation."""
    import resource

    import torch

    out: dict[str, Any] = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        out["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
    return out


def finetune_fields(
    cfg: FineTuneJobConfig, stats: ModelStats, examples: dict[str, int], saved: str
) -> dict[str, Any]:
    """The summary fields every FineTuneJob recipe adds: method, base model, what trained, data, form."""
    return {
        "method": cfg.spec.method,
        "base_model": cfg.paths.base_model,
        "trainable_parameters": stats.trainable,
        "trainable_fraction": stats.trainable_fraction,
        "examples": examples,
        "saved": saved,
    }


def publish(
    cfg: TrainingJobConfig | FineTuneJobConfig,
    save_model: Callable[[Path], None],
    tokenizer_files: dict[str, bytes],
    summary: dict[str, Any],
    reporter: progress.Reporter,
    title: str,
) -> None:
    """Rank 0, at the end: `save_model(dir)` writes the weights, then the tokenizer files,
    metrics.json, loss.png and job_config.json join them; the directory is copied to the job's
    output URI in one go and the `done` progress record is emitted."""
    target = storage.resolve(cfg.paths.output, cfg.paths.work_dir)
    with (
        storage_writes(target, "publishing the output", "spec.output.uri"),
        tempfile.TemporaryDirectory(prefix="forgeline-out-") as tmp,
    ):
        out = Path(tmp)
        save_model(out)
        for name, blob in tokenizer_files.items():
            (out / name).write_bytes(blob)
        write_metrics(out, summary)
        plot_loss(out, reporter.history, reporter.eval_history, title)
        (out / "job_config.json").write_text(json.dumps(json.loads(dump_job_config(cfg)), indent=2))
        record = lineage.record(cfg, summary, lineage.digest_dir(out))  # of everything above
        lineage.write(out, record)  # lineage.json and the model card, README.md
        storage.publish_dir(out, target)
        if reporter.tracker is not None:  # MLflow: artifacts, tags, the registered version
            reporter.tracker.finish(out, summary, lineage.digest(record), cfg.paths.output)
    progress.emit(
        {
            "type": "done",
            "output": cfg.paths.output,
            "final_loss": summary["final_loss"],
            "step": summary["steps"],
            "total_steps": summary["steps"],
            "ledger": reporter.ledger_record(),
            "lineage": lineage.summary(record),
        }
    )


def write_metrics(out_dir: Path, summary: dict[str, Any]) -> Path:
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=float) + "\n")
    return path


def plot_loss(out_dir: Path, history: list[dict[str, Any]], evals: list[dict[str, Any]], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if history:
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss", lw=1.2)
    eval_points = [e for e in evals if "eval_loss" in e]
    if eval_points:
        ax.plot(
            [e["step"] for e in eval_points],
            [e["eval_loss"] for e in eval_points],
            "o-",
            label="eval loss",
            lw=1.2,
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out_dir / "loss.png"
    fig.savefig(path)
    plt.close(fig)
    return path
