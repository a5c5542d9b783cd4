"""Pretraining data: read documents, filter them (with counts), split, tokenize, pack.

Runs once, in the Ray job's driver, before any training worker starts: a bad path or an empty
dataset fails the job early. The packed token blocks then go to the workers through Ray's object
store; each worker takes a deterministic slice of every global batch (see `batch_indices`).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import lineage, storage
from .errors import DataError

_WS = re.compile(r"\s+")


# -- reading -----------------------------------------------------------------------------------


def read_records(uri: str, fmt: str, work_dir: str | None = None) -> list[dict[str, Any]]:
    """All records of one source. text files give {"text": line} per non-empty line."""
    location = storage.resolve(uri, work_dir)
    if fmt == "saved-dataset":
        import datasets

        ds = datasets.load_from_disk(location)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        lineage.note_dataset(uri, getattr(ds, "_fingerprint", "") or "", len(ds))
        return list(ds)
    records: list[dict[str, Any]] = []
    for path in storage.expand(location):
        with storage.open_file(path) as f:
            raw = f.read()
        lineage.note_read(uri, str(path), raw)  # the digest of what was read (lineage.json)
        if fmt == "jsonl":
            for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            records.extend(pq.read_table(io.BytesIO(raw)).to_pylist())
        elif fmt == "text":
            records.extend({"text": line} for line in raw.decode("utf-8").splitlines() if line.strip())
        else:
            raise DataError(f"unknown data format {fmt!r}")
    return records


def read_texts(sources: Sequence[Any], text_field: str, work_dir: str | None = None) -> list[str]:
    """Documents of every source, mixed by weight (a source of weight w is repeated ~w× its share)."""
    per_source: list[tuple[float, list[str]]] = []
    for src in sources:
        records = read_records(src.uri, src.format, work_dir)
        field_name = "text" if src.format == "text" else text_field
        missing = sum(1 for r in records if not isinstance(r.get(field_name), str))
        if missing == len(records):
            raise DataError(
                f"{src.uri}: no record has a string field '{field_name}' "
                f"(spec.data.textField); fields seen: {sorted(records[0]) if records else []}"
            )
        per_source.append(
            (src.weight, [r[field_name] for r in records if isinstance(r.get(field_name), str)])
        )
    if len(per_source) == 1:
        return per_source[0][1]
    # Weighted mixing: scale each source so its share of documents follows its weight.
    total_w = sum(w for w, _ in per_source)
    biggest = max(len(d) / (w / total_w) for w, d in per_source)
    mixed: list[str] = []
    for w, docs in per_source:
        want = int(round(biggest * w / total_w))
        mixed.extend(docs[i % len(docs)] for i in range(want))
    return mixed


# -- filtering ---------------------------------------------------------------------------------


@dataclass
class FilterReport:
    """How many documents each filter removed (in the order they run)."""

    input: int = 0
    too_short: int = 0
    too_long: int = 0
    repeated_lines: int = 0
    duplicates: int = 0
    kept: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _normalised_hash(text: str) -> str:
    return hashlib.sha1(_WS.sub(" ", text.strip().lower()).encode()).hexdigest()


def repeated_line_ratio(text: str) -> float:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2:
        return 0.0
    counts = Counter(lines)
    return sum(c - 1 for c in counts.values()) / len(lines)


def apply_filters(docs: Iterable[str], filters: Any) -> tuple[list[str], FilterReport]:
    """Length bounds, repeated-line ratio, then exact dedup (by normalised hash)."""
    report = FilterReport()
    kept: list[str] = []
    seen: set[str] = set()
    for doc in docs:
        report.input += 1
        n = len(doc.strip())
        if n < max(filters.min_chars, 1):
            report.too_short += 1
            continue
        if filters.max_chars is not None and n > filters.max_chars:
            report.too_long += 1
            continue
        if (
            filters.max_repeated_line_ratio is not None
            and repeated_line_ratio(doc) > filters.max_repeated_line_ratio
        ):
            report.repeated_lines += 1
            continue
        if filters.dedup == "exact":
            h = _normalised_hash(doc)
            if h in seen:
                report.duplicates += 1
                continue
            seen.add(h)
        kept.append(doc)
    report.kept = len(kept)
    return kept, report


def holdout_indices(
    keys: Sequence[str], sizes: Sequence[int], fraction: float, min_tokens: int = 0
) -> tuple[list[int], list[int]]:
    """(train, held-out) item indices, split by the hash of each item's key: the items whose hash
    falls below `fraction` are held out, then, while they hold fewer than `min_tokens` tokens
    (`sizes`: tokens per item), the next items in hash order, up to half of the data. The same
    item always lands on the same side, whatever the order or the number of workers; a fraction of
    0 holds nothing out."""
    if fraction <= 0 or not keys:
        return list(range(len(keys))), []
    buckets = [int(hashlib.md5(k.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for k in keys]
    order = sorted(range(len(keys)), key=lambda i: (buckets[i], i))
    held: list[int] = []
    tokens = 0
    for i in order:
        within = buckets[i] < fraction
        if not within and (tokens >= min_tokens or len(held) >= len(keys) // 2):
            break
        held.append(i)
        tokens += sizes[i]
    if not held and len(keys) > 1:  # tiny datasets: hold out at least one item
        held.append(order[0])
    chosen = set(held)
    return [i for i in range(len(keys)) if i not in chosen], sorted(held)


def holdout_split(
    docs: Sequence[str], fraction: float, min_tokens: int = 0, sizes: Sequence[int] = ()
) -> tuple[list[str], list[str]]:
    """(train, held-out) documents by `holdout_indices` (sizes default to 0 tokens each)."""
    train, held = holdout_indices(docs, sizes or [0] * len(docs), fraction, min_tokens)
    return [docs[i] for i in train], [docs[i] for i in held]


# -- tokenizer ---------------------------------------------------------------------------------


SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
}
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(texts: Sequence[str], vocab_size: int, out_dir: str | Path):  # noqa: ANN201
    """A byte-level BPE tokenizer trained on the job's own documents (HF `tokenizers`), saved
    in transformers format so the model output carries it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def tokenizer_files(saved_dir: Path) -> dict[str, bytes]:
    """A saved tokenizer's files, to ship to the workers (they rebuild it with tokenizer_from_files)."""
    return {p.name: p.read_bytes() for p in saved_dir.iterdir() if p.is_file()}


def tokenizer_from_files(files: dict[str, bytes]):  # noqa: ANN201
    """A tokenizer from its saved files (the driver ships them to the workers as bytes)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="forgeline-tok-") as tmp:  # loaded into memory, then gone
        for name, blob in files.items():
            (Path(tmp) / name).write_bytes(blob)
        return load_tokenizer(tmp)


def load_tokenizer(location: str):  # noqa: ANN201
    """A saved tokenizer directory (or hub id); gets a pad token and a chat template if it lacks them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(location)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(tok, "chat_template", None) is None:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


# -- packing -----------------------------------------------------------------------------------


@dataclass
class TokenBlocks:
    """Fixed-length training sequences. `lengths` is the real length of each (packing: all full)."""

    tokens: np.ndarray  # int32 [n_blocks, seq_len]
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])


def tokenize(texts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """Token ids of each text (no special tokens; packing adds EOS between documents)."""
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []


def pack(ids: Sequence[Sequence[int]], tokenizer: Any, seq_len: int, packing: bool) -> TokenBlocks:
    """Packing: documents joined with EOS and cut into full `seq_len` blocks (the tail is dropped).
    Without packing: one document per block, truncated or padded."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if packing:
        flat = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int32)
        n = len(flat) // seq_len
        blocks = flat[: n * seq_len].reshape(n, seq_len)
        return TokenBlocks(blocks, np.full(n, seq_len, dtype=np.int32))
    blocks = np.full((len(ids), seq_len), pad, dtype=np.int32)
    lengths = np.zeros(len(ids), dtype=np.int32)
    for i, doc in enumerate(ids):
        doc = (list(doc) + [eos])[:seq_len]
        blocks[i, : len(doc)] = doc
        lengths[i] = len(doc)
    return TokenBlocks(blocks, lengths)


def tokenize_and_pack(texts: Sequence[str], tokenizer: Any, seq_len: int, packing: bool) -> TokenBlocks:
    """`pack(tokenize(texts))`."""
    return pack(tokenize(texts, tokenizer), tokenizer, seq_len, packing)


def batch_indices(n_items: int, global_batch: int, step: int, seed: int) -> np.ndarray:
    """The item indices of global batch `step` (0-based): a seeded permutation per epoch, so a run
    resumed at step N reads exactly the batches a straight run would have read."""
    per_epoch = max(n_items // global_batch, 1)
    epoch, pos = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_items)
    if n_items < global_batch:
        order = np.resize(order, global_batch)
    return order[pos * global_batch : (pos + 1) * global_batch]


def worker_slice(indices: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This worker's share of a global batch: a contiguous, equal-sized slice."""
    per = len(indices) // world
    return indices[rank * per : (rank + 1) * per]
