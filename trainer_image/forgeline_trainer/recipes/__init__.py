"""One module per method family (`launcher.recipe_for` picks it). Each has

    prepare(cfg, staging) -> its prepared data    in the Ray job's driver, once
    train_loop(loop_config)                        in every Ray Train worker

and passes the prepared data (a small dataclass; large parts as Ray object refs) to the workers
through Ray Train's `train_loop_config["prepared"]`.
"""

from __future__ import annotations

from typing import Any, Protocol


class Prepared(Protocol):
    """What the launcher reads from any recipe's prepared data."""

    tokenizer_files: dict[str, bytes]

    def report(self) -> dict[str, Any]:
        """The counts the launcher's "data ready" event carries (documents, blocks, examples...)."""
        ...
