"""Fine-tuning records → token ids with labels only on response tokens.

alpaca:      {"instruction", "input", "output"}   prompt = the Alpaca template; response = output
chat:        {"messages": [{role, content}, ...]}  the tokenizer's chat template; loss on assistant turns
preference:  {"prompt", "chosen", "rejected"}      (recipes/preference.py uses these as they are)
prompt:      {"prompt"}                            (recipes/rl.py)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import data as D
from .errors import DataError

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
IGNORE = -100

_REQUIRED = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
    "prompt": ("prompt",),
}


def read_examples(sources: Sequence[Any], fmt: str, work_dir: str | None) -> list[dict[str, Any]]:
    """Records of every source, checked for the fields the format needs (errors name the file)."""
    out: list[dict[str, Any]] = []
    for src in sources:
        records = D.read_records(src.uri, src.format, work_dir)
        for i, rec in enumerate(records):
            missing = [f for f in _REQUIRED[fmt] if f not in rec]
            if missing:
                raise DataError(
                    f"{src.uri} record {i + 1}: missing {missing} for "
                    f"spec.dataset.format {fmt} (fields: {sorted(rec)})"
                )
        out.extend(records)
    if not out:
        raise DataError("spec.dataset: no records")
    return out


def alpaca_prompt(rec: dict[str, Any]) -> str:
    if rec.get("input"):
        return ALPACA_WITH_INPUT.format(instruction=rec["instruction"], input=rec["input"])
    return ALPACA_NO_INPUT.format(instruction=rec["instruction"])


def prompt_of(rec: dict[str, Any], fmt: str, tokenizer: Any) -> str:
    """The prompt text of a record (for generation in RL and for probes)."""
    if fmt == "alpaca":
        return alpaca_prompt(rec)
    if fmt == "chat":
        msgs = rec["messages"]
        last_user = max(i for i, m in enumerate(msgs) if m["role"] != "assistant")
        return tokenizer.apply_chat_template(
            msgs[: last_user + 1], tokenize=False, add_generation_prompt=True
        )
    return rec["prompt"]


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]

    @property
    def response_tokens(self) -> int:
        """Tokens the loss is taken on."""
        return sum(label != IGNORE for label in self.labels)


def tokenize_example(
    rec: dict[str, Any], fmt: str, tokenizer: Any, max_len: int, loss_on_prompt: bool
) -> Tokenized:
    segments: list[tuple[str, bool]]  # (text, is_response)
    if fmt == "alpaca":
        segments = [(alpaca_prompt(rec), False), (str(rec["output"]) + tokenizer.eos_token, True)]
        ids, labels = [], []
        for text, is_resp in segments:
            seg = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += seg
            labels += seg if (is_resp or loss_on_prompt) else [IGNORE] * len(seg)
    elif fmt == "chat":
        ids, labels = [], []
        msgs = rec["messages"]
        prev = ""
        for k in range(len(msgs)):
            text = tokenizer.apply_chat_template(msgs[: k + 1], tokenize=False)
            piece = text[len(prev) :] if text.startswith(prev) else text
            prev = text
            seg = tokenizer(piece, add_special_tokens=False)["input_ids"]
            ids += seg
            is_resp = msgs[k]["role"] == "assistant"
            labels += seg if (is_resp or loss_on_prompt) else [IGNORE] * len(seg)
    else:
        raise ValueError(f"format {fmt} is not a supervised format")
    if len(ids) > max_len:
        # Keep the end (the response); drop the oldest prompt tokens.
        ids, labels = ids[-max_len:], labels[-max_len:]
    return Tokenized(ids, labels)


def record_key(rec: dict[str, Any]) -> str:
    """The record's canonical JSON: what the holdout split hashes."""
    return json.dumps(rec, sort_keys=True)


def holdout(
    records: list[dict[str, Any]], fraction: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic split by record hash (stable across runs and worker counts)."""
    train, held = D.holdout_indices([record_key(r) for r in records], [0] * len(records), fraction)
    return [records[i] for i in train], [records[i] for i in held]


def collate(examples: Sequence[Tokenized], pad_id: int, device: Any) -> dict[str, Any]:
    """Right-padded batch tensors."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attn[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "labels": labels.to(device)}
