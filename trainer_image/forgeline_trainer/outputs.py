"""What a finished job leaves at its output URI besides the model: metrics.json and loss.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
