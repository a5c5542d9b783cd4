"""Lineage records and model cards (forgeline_trainer/lineage.py) and `forgeline lineage`, on
files made here. Real jobs' records: test_trainer.py (continued pretraining reaches back to the
pretraining) and test_kube_e2e.py (the pipeline's status.lineage, in pods)."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from forgeline_operator.api import parse_job
from forgeline_operator.api.jobconfig import build_job_config
from forgeline_operator.cli import lineage_cli

from .conftest import EXAMPLES


@pytest.fixture
def lineage() -> Any:
    from forgeline_trainer import lineage as module

    module._reads.clear()
    yield module
    module._reads.clear()


def test_a_data_source_digest_is_of_the_bytes_read_and_a_second_read_changes_nothing(lineage: Any) -> None:
    lineage.note_read("s3://b/data/", "/cache/b/data/a.jsonl", b'{"text": "a"}\n')
    lineage.note_read("s3://b/data/", "/cache/b/data/b.jsonl", b'{"text": "b"}\n')
    once = lineage.data_reads()
    lineage.note_read("s3://b/data/", "/cache/b/data/a.jsonl", b'{"text": "a"}\n')  # read again
    assert lineage.data_reads() == once
    (row,) = once
    sha_a = hashlib.sha256(b'{"text": "a"}\n').hexdigest()
    sha_b = hashlib.sha256(b'{"text": "b"}\n').hexdigest()
    expected = hashlib.sha256(f"a.jsonl {sha_a}\nb.jsonl {sha_b}\n".encode()).hexdigest()
    assert row == {"uri": "s3://b/data/", "sha256": expected, "files": 2, "bytes": 28}
    lineage.note_read("s3://b/data/", "/cache/b/data/b.jsonl", b'{"text": "B"}\n')  # changed content
    assert lineage.data_reads()[0]["sha256"] != expected


def test_a_directory_digest_ignores_the_record_and_card_and_sees_any_byte(
    lineage: Any, tmp_path: Path
) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    (tmp_path / "sub" / "x.json").write_text("{}")
    first = lineage.digest_dir(tmp_path)
    assert first["files"] == 2 and first["bytes"] == 102
    (tmp_path / "lineage.json").write_text("{}")
    (tmp_path / "README.md").write_text("# card")
    (tmp_path / "checkpoints" / "checkpoint_000020").mkdir(parents=True)  # a job's own checkpoints
    (tmp_path / "checkpoints" / "checkpoint_000020" / "state.pt").write_bytes(b"optimizer")
    assert lineage.digest_dir(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 99 + b"\x01")
    assert lineage.digest_dir(tmp_path)["sha256"] != first["sha256"]


def _cfg(example: str, base_model: str | None = None) -> Any:
    job = parse_job(yaml.safe_load((EXAMPLES / f"{example}.yaml").read_text()))
    return build_job_config(
        job, base_model=base_model, trainer_image="ghcr.io/forgeline/trainer@sha256:" + "ab" * 32
    )


def _summary(before: float, after: float) -> dict[str, Any]:
    return {
        "initial_eval": {"step": 0, "eval_loss": before, "eval_loss_ci95": 0.02, "eval_tokens": 2400.0},
        "final_eval": {"eval_loss": after, "eval_loss_ci95": 0.02, "perplexity": 2.0, "eval_tokens": 2400.0},
        "promotion": {"promoted": True, "reason": "Improved", "message": "eval_loss 5 → 3: promoted"},
        "goodput_ledger": {"steps": 12.0},
        "steps": 60,
    }


def test_a_record_nests_its_upstream_and_the_chain_reaches_back(lineage: Any, tmp_path: Path) -> None:
    pre_out = tmp_path / "runs" / "tiny-llama"
    pre_out.mkdir(parents=True)
    (pre_out / "model.safetensors").write_bytes(b"weights")
    lineage.note_read("examples/data/corpus.jsonl", "corpus.jsonl", b"corpus")
    pre = lineage.record(
        _cfg("pretrain-tiny-llama"),
        _summary(6.2, 3.9),
        lineage.digest_dir(pre_out),
        lineage.driver_inputs(_cfg("pretrain-tiny-llama")),
    )
    lineage.write(pre_out, pre)
    lineage._reads.clear()
    cfg = _cfg("finetune-lora-tiny", base_model=str(pre_out))
    inputs = lineage.driver_inputs(cfg)
    assert inputs["baseModel"]["digest"] == pre["output"]["digest"]  # taken from its record, not rehashed
    rec = lineage.record(cfg, _summary(3.1, 2.2), {"sha256": "f" * 64, "files": 3, "bytes": 10}, inputs)
    assert rec["schema"] == "forgeline.dev/lineage/v1" and rec["job"]["method"] == "lora"
    assert rec["trainerImage"]["digest"] == "sha256:" + "ab" * 32 and rec["seed"] == cfg.spec.training.seed
    assert {"forgeline", "torch", "transformers", "ray", "peft"} <= set(rec["versions"])
    assert rec["config"]["sha256"] == lineage.config_digest(cfg) and len(rec["config"]["sha256"]) == 64
    chain = lineage.chain(rec)
    assert [c["job"]["name"] for c in chain] == ["tiny-sft-lora", "tiny-llama"]
    summary = lineage.summary(rec)
    assert summary["digest"] == lineage.digest(rec) and summary["upstream"] == [
        {"job": "TrainingJob/tiny-llama", "digest": lineage.digest(pre)}
    ]
    assert summary["baseModel"]["sha256"] == pre["output"]["digest"]["sha256"]
    # the config digest is the same for every attempt and changes with what trains
    again = build_job_config(
        parse_job(yaml.safe_load((EXAMPLES / "finetune-lora-tiny.yaml").read_text())),
        base_model=str(pre_out),
        attempt=3,
    )
    assert lineage.config_digest(again) == lineage.config_digest(cfg)


def test_the_model_card_is_a_hugging_face_card_with_model_index_results(lineage: Any, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    lineage.note_read("examples/data/corpus.jsonl", "corpus.jsonl", b"corpus")
    cfg = _cfg("pretrain-tiny-llama")
    rec = lineage.record(
        cfg, _summary(6.2, 3.9), {"sha256": "e" * 64, "files": 5, "bytes": 100}, lineage.driver_inputs(cfg)
    )
    lineage.write(tmp_path, rec)
    card = ModelCard.load(tmp_path / "README.md")
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"loss": 3.9, "perplexity": 2.0}
    assert "forgeline" in card.data.tags and card.data.model_name == cfg.name
    assert "| eval_loss | 6.2 | 3.9 | 0.02 |" in card.text and "**Promotion:** Improved" in card.text
    assert json.loads((tmp_path / "lineage.json").read_text()) == rec


def test_forgeline_lineage_prints_the_chain_from_an_output_directory(lineage: Any, tmp_path: Path) -> None:
    pre_out, sft_out = tmp_path / "pre", tmp_path / "sft"
    for d in (pre_out, sft_out):
        d.mkdir()
        (d / "model.safetensors").write_bytes(d.name.encode())
    lineage.note_read("examples/data/corpus.jsonl", "corpus.jsonl", b"corpus")
    pre_cfg = _cfg("pretrain-tiny-llama")
    lineage.write(
        pre_out,
        lineage.record(
            pre_cfg, _summary(6.2, 3.9), lineage.digest_dir(pre_out), lineage.driver_inputs(pre_cfg)
        ),
    )
    cfg = _cfg("finetune-lora-tiny", base_model=str(pre_out))
    lineage.write(
        sft_out,
        lineage.record(cfg, _summary(3.1, 2.2), lineage.digest_dir(sft_out), lineage.driver_inputs(cfg)),
    )
    records = lineage_cli.records_from_file(sft_out)
    assert [r["job"]["kind"] for r in records] == ["FineTuneJob", "TrainingJob"]
    out = io.StringIO()
    lineage_cli.render_records(records, Console(file=out, width=200, highlight=False))
    text = out.getvalue()
    assert text.index("FineTuneJob/") < text.index("TrainingJob/")
    assert "↑ base model" in text and "trained by the job below" in text and "↑ trained from scratch" in text
    assert "evals eval_loss 3.1 → 2.2, perplexity 2 (2,400 held-out tokens)" in text
    args = argparse.Namespace(name=str(sft_out), namespace="ns", kind=None, kubeconfig=None, output="json")
    assert lineage_cli.main(args) == 0
