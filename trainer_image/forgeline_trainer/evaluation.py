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

from forgeline_operator.api.status import MIN_EVAL_TOKENS, eval_size_warning

__all__ = ["MIN_EVAL_TOKENS", "eval_size_warning", "mean_ci95", "proportion_ci95"]

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
