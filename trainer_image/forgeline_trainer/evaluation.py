"""How far to trust a held-out evaluation: its size and a 95% confidence interval per metric.

A loss on 166 held-out tokens, or an accuracy of 0.5 from one example, is noise that reads like a
result. Every eval record therefore carries its size (`eval_tokens`) and, next to each metric, the
half-width of a normal-approximation 95% interval (`eval_loss_ci95`, `accuracy_ci95`). An eval under
`MIN_EVAL_TOKENS` also gets a warning event that says what to change.

The loss interval uses per-token losses for fine-tunes. It uses per-batch mean losses for
pretraining, where the tokens of one packed block are not independent. Tokens of one example are
correlated too, so the fine-tune interval is a lower bound on the real uncertainty. Accuracy is a
binomial proportion over tokens, with the same caveat.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from forgeline_operator.api.status import MIN_EVAL_TOKENS, eval_size_warning

from . import collective, sft_data

__all__ = ["MIN_EVAL_TOKENS", "eval_size_warning", "mean_ci95", "proportion_ci95", "response_metrics"]

_Z95 = 1.96


def mean_ci95(mean: float, mean_of_squares: float, n: float) -> float | None:
    """Half-width of the 95% interval of a mean from n samples, given the mean and the mean of
    the squares (sample variance with Bessel's correction); None for fewer than 2 samples."""
    if n < 2:
        return None
    variance = max(mean_of_squares - mean * mean, 0.0) * n / (n - 1)
    return _Z95 * math.sqrt(variance / n)


def proportion_ci95(p: float, n: float) -> float | None:
    """Half-width of the 95% interval of a proportion p measured on n trials; None for n = 0."""
    if n <= 0:
        return None
    return _Z95 * math.sqrt(max(p * (1.0 - p), 0.0) / n)


def response_metrics(
    net: Any,
    examples: Sequence[sft_data.Tokenized],
    pad_id: int,
    device: Any,
    micro: int,
    max_batches: int,
    rank: int = 0,
    world: int = 1,
) -> dict[str, float | None]:
    """A fine-tune's held-out metrics: response-token loss and next-token accuracy (each with its
    95% interval), perplexity and the tokens they were measured on, over every worker's slice of
    `examples` (at most `max_batches` batches of `micro` per worker)."""
    import torch

    mine = list(range(rank, len(examples), world))
    batches = [mine[i : i + micro] for i in range(0, len(mine), micro)][:max_batches]
    # DDP's forward broadcasts buffers and ZeRO-3 gathers parameters: every rank must run the same
    # number of forwards, so ranks with fewer batches run (and ignore) extra ones.
    n_batches = int(collective.maximum(len(batches)))
    loss_sum = torch.zeros((), device=device)
    loss_sq = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    net.eval()
    with torch.no_grad():
        for i in range(n_batches):
            real = i < len(batches)
            idx = batches[i] if real else [0]
            batch = sft_data.collate([examples[j] for j in idx], pad_id, device)
            out = net(**batch)
            if not real:
                continue
            logits = out.logits[:, -batch["labels"].shape[1] :, :]  # prompt tuning prepends virtual tokens
            shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
            mask = shift_labels != sft_data.IGNORE
            token_losses = torch.nn.functional.cross_entropy(
                shift_logits[mask].float(), shift_labels[mask], reduction="none"
            )
            loss_sum += token_losses.sum()
            loss_sq += (token_losses**2).sum()
            correct += (shift_logits.argmax(-1)[mask] == shift_labels[mask]).sum()
            count += mask.sum()
    net.train()
    if torch.distributed.is_initialized():
        for t in (loss_sum, loss_sq, correct, count):
            torch.distributed.all_reduce(t)
    c = count.clamp(min=1)
    loss, accuracy, n = (loss_sum / c).item(), (correct / c).item(), count.item()
    return {
        "eval_loss": loss,
        "eval_loss_ci95": mean_ci95(loss, (loss_sq / c).item(), n),
        "perplexity": math.exp(min(loss, 50.0)),
        "accuracy": accuracy,
        "accuracy_ci95": proportion_ci95(accuracy, n),
        "eval_tokens": float(n),
    }
