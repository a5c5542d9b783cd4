"""Trainer building blocks without Ray: filters, splits, data order, schedules, configs, parsing."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from forgeline_operator.api import parse_job
from forgeline_operator.api.common import DeepSpeed, QualityFilters
from forgeline_operator.api.finetune_job import FineTuneOptimization
from forgeline_operator.api.jobconfig import (
    build_job_config,
    dump_job_config,
    load_job_config,
    spec_fingerprint,
)
from forgeline_operator.rayjobs import LogCursor, parse_records
from forgeline_trainer import data as D
from forgeline_trainer import optim, sft_data

from .conftest import EXAMPLES

GOOD = [
    f"Document number {i} talks about the {animal} and its {thing}."
    for i, (animal, thing) in enumerate(
        [
            ("cat", "fish"),
            ("dog", "bones"),
            ("cow", "grass"),
            ("duck", "pond"),
            ("owl", "tree"),
            ("pig", "pen"),
        ]
    )
]


def test_quality_filters_remove_exactly_the_junk(tmp_path: Path) -> None:
    """A file with known duplicates and junk loses exactly those, each counted under its filter."""
    junk_short = ["ok", "   "]
    junk_long = ["x" * 500]
    boilerplate = ["Subscribe now!\nSubscribe now!\nSubscribe now!\nReal text here."]
    duplicates = [GOOD[0], GOOD[1].upper(), "  " + GOOD[2].replace(" ", "   ") + "\n"]  # normalised equal
    rows = GOOD + junk_short + junk_long + boilerplate + duplicates
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": r}) + "\n" for r in rows))
    src = SimpleNamespace(uri=str(path), format="jsonl", weight=1.0)
    docs = D.read_texts([src], "body")
    kept, report = D.apply_filters(
        docs, QualityFilters(min_chars=10, max_chars=200, dedup="exact", max_repeated_line_ratio=0.3)
    )
    assert kept == GOOD
    assert report.as_dict() == {
        "input": 13,
        "too_short": 2,
        "too_long": 1,
        "repeated_lines": 1,
        "duplicates": 3,
        "kept": 6,
    }


def test_dedup_off_keeps_duplicates() -> None:
    kept, report = D.apply_filters(GOOD + GOOD, QualityFilters(dedup="none"))
    assert len(kept) == 12 and report.duplicates == 0


def test_missing_text_field_names_the_spec_field(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(ValueError, match=r"textField.*content"):
        D.read_texts([SimpleNamespace(uri=str(path), format="jsonl", weight=1.0)], "text")


def test_bad_jsonl_line_is_reported_with_its_number(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid JSON"):
        D.read_records(str(path), "jsonl")


def test_glob_directory_text_and_parquet_sources(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    pq.write_table(pa.table({"text": ["third doc", "fourth doc"]}), tmp_path / "b.parquet")
    assert D.read_records(str(tmp_path / "*.txt"), "text") == [{"text": "first doc"}, {"text": "second doc"}]
    assert [r["text"] for r in D.read_records(str(tmp_path / "b.parquet"), "parquet")] == [
        "third doc",
        "fourth doc",
    ]
    with pytest.raises(FileNotFoundError, match="no data at"):
        D.read_records(str(tmp_path / "*.jsonl"), "jsonl")


def test_saved_hf_dataset_source(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list([{"text": "one"}, {"text": "two"}]).save_to_disk(str(tmp_path / "ds"))
    assert [r["text"] for r in D.read_records(str(tmp_path / "ds"), "saved-dataset")] == ["one", "two"]


def test_weighted_mixing(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a\n" * 10)
    (tmp_path / "b.txt").write_text("b\n" * 10)
    docs = D.read_texts(
        [
            SimpleNamespace(uri=str(tmp_path / "a.txt"), format="text", weight=3.0),
            SimpleNamespace(uri=str(tmp_path / "b.txt"), format="text", weight=1.0),
        ],
        "text",
    )
    assert docs.count("a") == 3 * docs.count("b")


def test_holdout_is_stable_and_disjoint() -> None:
    docs = [f"doc {i}" for i in range(1000)]
    train, held = D.holdout_split(docs, 0.1)
    assert 50 < len(held) < 150 and not set(train) & set(held)
    train2, held2 = D.holdout_split(list(reversed(docs)), 0.1)
    assert set(held2) == set(held)


def test_batch_order_is_a_function_of_the_step() -> None:
    """Resuming at step N reads exactly the batches an uninterrupted run reads."""
    a = [D.batch_indices(100, 16, s, seed=7) for s in range(20)]
    b = [D.batch_indices(100, 16, s, seed=7) for s in range(20)]
    assert all((x == y).all() for x, y in zip(a, b, strict=False))
    epoch0 = np.concatenate(a[:6])
    assert len(set(epoch0.tolist())) == 96  # no repeats within an epoch
    halves = [D.worker_slice(a[0], r, 2) for r in range(2)]
    assert not set(halves[0]) & set(halves[1]) and len(halves[0]) == 8


def test_tokenize_and_pack_full_blocks() -> None:
    tok = D.train_tokenizer(GOOD * 20, 300, Path(__import__("tempfile").mkdtemp()))
    blocks = D.tokenize_and_pack(GOOD * 20, tok, 16, packing=True)
    assert blocks.tokens.shape[1] == 16 and (blocks.lengths == 16).all()
    assert tok.eos_token_id in blocks.tokens
    unpacked = D.tokenize_and_pack(GOOD, tok, 64, packing=False)
    assert unpacked.n == len(GOOD) and (unpacked.lengths < 64).all()


def test_lr_schedules() -> None:
    spec = FineTuneOptimization(
        max_steps=100, warmup_steps=10, schedule="cosine", min_learning_rate_ratio=0.1
    )
    f = optim.lr_lambda(spec, 100)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(55) == pytest.approx(0.55, abs=0.01)
    wsd = optim.lr_lambda(spec.model_copy(update={"schedule": "wsd"}), 100)
    assert wsd(50) == 1.0 and wsd(100) == pytest.approx(0.1)


def test_batch_plan_and_deepspeed_config() -> None:
    plan = optim.batch_plan(32, 8, 2)
    assert plan.accumulation == 2 and plan.global_batch == 32
    with pytest.raises(ValueError):
        optim.batch_plan(30, 8, 2)
    opt = FineTuneOptimization(max_steps=1)
    ds = DeepSpeed(
        zero_stage=3,
        offload_optimizer=True,
        offload_params=True,
        config={"zero_optimization": {"overlap_comm": True}},
    )
    cfg = optim.deepspeed_config(ds, opt, plan, bf16=True, on_gpu=True)
    assert cfg["train_batch_size"] == 32 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["zero_optimization"]["overlap_comm"] is True
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["bf16"]["enabled"] and cfg["optimizer"]["type"] == "AdamW"
    cpu = optim.deepspeed_config(DeepSpeed(zero_stage=2), opt, plan, bf16=False, on_gpu=False)
    assert "optimizer" not in cpu  # a torch AdamW runs ZeRO on CPU


def test_alpaca_and_chat_labels_cover_only_responses() -> None:
    tok = D.load_tokenizer(str(_tiny_tokenizer()))
    rec = {"instruction": "What sound does the cat make?", "input": "", "output": "The cat says meow."}
    t = sft_data.tokenize_example(rec, "alpaca", tok, 512, loss_on_prompt=False)
    learned = tok.decode([i for i, lab in zip(t.input_ids, t.labels, strict=True) if lab != sft_data.IGNORE])
    assert learned.startswith("The cat says meow.") and "Instruction" not in learned
    chat = {
        "messages": [
            {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello there."},
            {"role": "user", "content": "Bye?"},
            {"role": "assistant", "content": "Goodbye."},
        ]
    }
    c = sft_data.tokenize_example(chat, "chat", tok, 512, loss_on_prompt=False)
    learned = tok.decode([i for i, lab in zip(c.input_ids, c.labels, strict=True) if lab != sft_data.IGNORE])
    assert "Hello there." in learned and "Goodbye." in learned and "Hi?" not in learned
    short = sft_data.tokenize_example(rec, "alpaca", tok, 8, loss_on_prompt=False)
    assert len(short.input_ids) == 8 and any(lab != sft_data.IGNORE for lab in short.labels)


def _tiny_tokenizer() -> Path:
    import tempfile

    d = Path(tempfile.mkdtemp())
    D.train_tokenizer(GOOD * 10 + ["Instruction Response Hello Goodbye meow"], 400, d)
    return d


def test_job_config_round_trip_and_fingerprint() -> None:
    job = parse_job(yaml.safe_load((EXAMPLES / "finetune-lora-tiny.yaml").read_text()))
    cfg = build_job_config(job, output="/out", work_dir="/w")
    again = load_job_config(dump_job_config(cfg))
    assert again == cfg and again.paths.base_model == "runs/tiny-llama"
    assert again.paths.checkpoints == "/out/checkpoints"
    suspended = job.model_copy(
        update={"spec": job.spec.model_copy(update={"suspend": True, "backoff_limit": 9})}
    )
    assert spec_fingerprint(suspended.spec) == spec_fingerprint(job.spec)
    changed = job.spec.model_copy(update={"method": "full", "lora": None})
    assert spec_fingerprint(changed) != spec_fingerprint(job.spec)
    pipe = [
        parse_job(d) for d in yaml.safe_load_all((EXAMPLES / "pipeline-pretrain-sft-dpo.yaml").read_text())
    ]
    with pytest.raises(ValueError, match="must be resolved first"):
        build_job_config(pipe[1])
    assert build_job_config(pipe[1], base_model="/models/pre").paths.base_model == "/models/pre"


def test_progress_records_parse_from_ray_logs() -> None:
    log = (
        '\x1b[36m(RayTrainWorker pid=1)\x1b[0m FORGELINE_PROGRESS {"type":"progress","step":3}\n'
        "noise FORGELINE_PROGRESS {broken\n"
        'FORGELINE_PROGRESS {"type":"eval","step":3,"eval_loss":1.5}\n'
        'FORGELINE_PROGRESS {"type":"progress","step":4'
    )  # incomplete last line
    assert [r["type"] for r in parse_records(log)] == ["progress", "eval"]
    cursor = LogCursor()
    first = cursor.feed(log)
    assert [r.get("step") for r in first] == [3, 3]
    more = cursor.feed(log + ',"loss":2.0}\n')
    assert more == [{"type": "progress", "step": 4, "loss": 2.0}]
    assert cursor.latest["progress"]["step"] == 4
