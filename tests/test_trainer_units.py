"""Trainer building blocks without Ray: filters, splits, data order, schedules, configs, parsing."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

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
from forgeline_operator.rayclient.rayjobs import LogCursor, parse_records
from forgeline_trainer import adapters, lineage, models, optim, outputs, progress, sft_data
from forgeline_trainer import data as D
from forgeline_trainer.runtime import Worker
from forgeline_trainer.runtime_info import RuntimeInfo

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


def test_holdout_is_sized_in_tokens() -> None:
    """The fraction's items, then more in hash order until the token floor, never past half."""
    docs = [f"doc {i}" for i in range(1000)]
    sizes = [10] * 1000
    _, by_fraction = D.holdout_indices(docs, sizes, 0.01, min_tokens=0)
    _, floored = D.holdout_indices(docs, sizes, 0.01, min_tokens=2000)
    assert 3 <= len(by_fraction) <= 25
    assert set(by_fraction) < set(floored) and len(floored) == 200  # 200 x 10 tokens
    _, capped = D.holdout_indices(docs, sizes, 0.01, min_tokens=10**9)
    assert len(capped) == 500  # half of the data at most
    _, big_fraction = D.holdout_indices(docs, sizes, 0.3, min_tokens=2000)
    assert len(big_fraction) > 250  # the fraction wins when it is larger
    _, none = D.holdout_indices(docs, sizes, 0.0, min_tokens=2000)
    assert none == []  # fraction 0: evaluation off
    _, reordered = D.holdout_indices(list(reversed(docs)), sizes, 0.01, min_tokens=2000)
    assert {docs[999 - i] for i in reordered} == {docs[i] for i in floored}


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


# -- shared recipe plumbing --------------------------------------------------------------------


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def test_flops_per_token_full_and_peft() -> None:
    """A fine-tune that trains every weight costs what pretraining costs; a frozen base saves 2·N."""
    n, layers, d, s = 1_000_000, 4, 256, 128
    assert progress.peft_flops_per_token(n, n, layers, d, s) == progress.model_flops_per_token(
        n, layers, d, s
    )
    assert progress.peft_flops_per_token(n, 0, layers, d, s) == 4.0 * n + 12.0 * layers * d * s


def test_model_stats_pretrain_and_lora() -> None:
    from peft import get_peft_model

    from forgeline_operator.api.finetune_job import LoraSettings

    model = _tiny_llama()
    full = models.pretrain_stats(model, 16)
    layers, hidden = models.shape(model)
    assert full.parameters == full.trainable == sum(p.numel() for p in model.parameters())
    assert full.flops_per_token == progress.model_flops_per_token(
        models.active_params(model), layers, hidden, 16
    )
    lora = get_peft_model(model, adapters.lora_config(LoraSettings(r=4, alpha=8), "CAUSAL_LM"))
    stats = models.finetune_stats(lora, 16)
    assert 0 < stats.trainable < stats.parameters and stats.trainable_fraction < 0.5
    assert stats.flops_per_token == progress.peft_flops_per_token(
        models.active_params(lora), stats.trainable, layers, hidden, 16
    )


def test_lora_config_from_the_spec() -> None:
    from forgeline_operator.api.finetune_job import LoraSettings

    assert adapters.lora_config(None, "CAUSAL_LM") is None
    cfg = adapters.lora_config(LoraSettings(r=8, alpha=16, target_modules=["all-linear"]), "SEQ_CLS")
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules, cfg.task_type) == (8, 16, "all-linear", "SEQ_CLS")
    named = adapters.lora_config(LoraSettings(target_modules=["q_proj", "v_proj"]), "CAUSAL_LM")
    assert set(named.target_modules) == {"q_proj", "v_proj"}


def test_engine_step_clips_or_only_measures() -> None:
    """Without DeepSpeed: clip to gradClip (0: leave the gradients, report their norm), step, schedule."""
    torch = pytest.importorskip("torch")

    def engine(clip_model: Any) -> optim.TrainEngine:
        opt = torch.optim.SGD(clip_model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
        return optim.TrainEngine(
            engine=None,
            model=clip_model,
            net=clip_model,
            optimizer=opt,
            scheduler=sched,
            device=torch.device("cpu"),
            plan=optim.BatchPlan(world=1, micro=1, accumulation=2),
            total_steps=3,
            bf16=False,
            trainable=list(clip_model.parameters()),
        )

    for clip in (0.0, 0.01):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        eng = engine(model)
        for _ in range(eng.plan.accumulation):
            eng.backward(model(torch.ones(1, 4)).sum() * 10)
        norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
        before = [p.detach().clone() for p in model.parameters()]
        grad_norm = eng.optimizer_step(clip)
        assert float(grad_norm) == pytest.approx(norm)
        moved = float(
            torch.linalg.vector_norm(
                torch.cat(
                    [(b - p.detach()).flatten() for b, p in zip(before, model.parameters(), strict=True)]
                )
            )
        )
        assert moved == pytest.approx(0.1 * (min(norm, clip) if clip else norm), rel=1e-4)
        assert all(p.grad is None for p in model.parameters()) and eng.lr == pytest.approx(0.05)


def _reporter(kind: str = "TrainingJob") -> progress.Reporter:
    r = progress.Reporter(
        job="tiny",
        namespace="default",
        kind=kind,
        total_steps=2,
        tokens_per_step=64,
        flops_per_token=1.0,
        peak_flops_total=1e9,
        interval=0,
        peak_source="measured",
    )
    r.step(1, 3.0, 1e-3)
    r.step(2, 2.0, 1e-3)
    return r


def _worker(cfg: Any) -> Worker:
    return Worker(cfg, RuntimeInfo(rank=0, world=2, local_rank=0, on_gpu=False), False, "fp32")


def test_a_4bit_layer_counts_its_weights_not_its_packed_bytes() -> None:
    """bitsandbytes packs two 4-bit weights per stored element: QLoRA's parameter count and
    trainable fraction (and its FLOPs for MFU) must count the layer's real weights."""
    import bitsandbytes as bnb
    import torch

    layer = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4", compute_dtype=torch.float32).to("cpu")
    assert layer.weight.numel() == 64 * 32 // 2  # what numel() sees
    assert models.weights(layer.weight) == 64 * 32
    assert models.weights(torch.nn.Parameter(torch.zeros(3, 5))) == 15


def test_summary_has_the_common_fields_then_the_recipes() -> None:
    job = parse_job(yaml.safe_load((EXAMPLES / "finetune-lora-tiny.yaml").read_text()))
    cfg = build_job_config(job, output="/out", work_dir="/w")
    stats = models.ModelStats(parameters=1000, trainable=10, flops_per_token=1.0)
    reporter = _reporter("FineTuneJob")
    summary = outputs.summary(
        _worker(cfg),
        reporter,
        stats,
        {"eval_loss": 1.5},
        **outputs.finetune_fields(cfg, stats, {"train": 8, "eval": 2}, "adapter"),
        extra=1,
    )
    assert summary.pop("peak_rss_bytes") > 10 * 2**20  # this process's peak RSS: torch alone is more
    assert summary.pop("goodput_ledger") == reporter.ledger_record()  # where the attempt's time went
    assert summary == {
        "job": cfg.name,
        "kind": "FineTuneJob",
        "parameters": 1000,
        "steps": 2,
        "first_loss": 3.0,
        "final_loss": 2.0,
        "initial_eval": None,
        "final_eval": {"eval_loss": 1.5},
        "promotion": None,  # no spec.promotion: no gate
        "tokens_per_second": reporter.last["tokens_per_second"],
        "mfu": reporter.last["mfu"],
        "mfu_peak_source": "measured",
        "wall_seconds": reporter.last["elapsed_seconds"],
        "world_size": 2,
        "precision": "fp32",
        "optimizer": "adamw",
        "method": "lora",
        "base_model": "runs/tiny-llama",
        "trainable_parameters": 10,
        "trainable_fraction": 0.01,
        "examples": {"train": 8, "eval": 2},
        "saved": "adapter",
        "extra": 1,
    }


def test_publish_writes_every_output_file_then_says_done(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = parse_job(yaml.safe_load((EXAMPLES / "pretrain-tiny-llama.yaml").read_text()))
    cfg = build_job_config(job, output="out/model", work_dir=str(tmp_path))
    reporter = _reporter()
    capsys.readouterr()
    summary = outputs.summary(_worker(cfg), reporter, models.ModelStats(100, 100, 1.0), {})

    def save_model(out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"weights")

    outputs.publish(cfg, save_model, {"tokenizer.json": b"{}"}, summary, reporter, "tiny (llama)")
    out = tmp_path / "out" / "model"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",  # the model card
        "job_config.json",
        "lineage.json",
        "loss.png",
        "metrics.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert json.loads((out / "metrics.json").read_text())["final_loss"] == 2.0
    assert load_job_config((out / "job_config.json").read_text()) == cfg
    (done,) = parse_records(capsys.readouterr().out)
    assert abs(done.pop("time") - time.time()) < 60  # every record carries when it was written
    assert set(done.pop("ledger")) == {*progress.LEDGER, "stepsTimed", "group"}  # goodput's (no restore ran)
    record = json.loads((out / "lineage.json").read_text())
    assert done.pop("lineage")["digest"] == lineage.digest(record)  # status.lineage's summary of it
    assert record["output"]["digest"] == lineage.digest_dir(out)
    assert done == {"type": "done", "output": "out/model", "final_loss": 2.0, "step": 2, "total_steps": 2}


def test_dpo_accuracy_counts_a_tie_as_a_tie_not_a_wrong_answer() -> None:
    from forgeline_trainer.recipes.preference import dpo_accuracy

    # untrained: policy = reference, no margin above 0 and their mean exactly 0 → all ties
    tied = {"preference_accuracy": 0.5, "preference_ties": 1.0, "reward_margin": 0.0}
    assert dpo_accuracy(0.0, 0.0) == tied
    # every margin below 0 is wrong, not tied; trained margins are TRL's strict share
    assert dpo_accuracy(0.0, -0.02) == {"preference_accuracy": 0.0, "reward_margin": -0.02}
    assert dpo_accuracy(0.81, 0.4) == {"preference_accuracy": 0.81, "reward_margin": 0.4}


def test_recipes_follow_the_apis_method_groups() -> None:
    from typing import get_args

    from forgeline_operator.api.finetune_job import (
        MERGE_METHOD,
        PREFERENCE_METHODS,
        RL_METHODS,
        SFT_METHODS,
        Method,
    )
    from forgeline_trainer import launcher

    groups = {
        "finetune": SFT_METHODS,
        "preference": PREFERENCE_METHODS,
        "rl": RL_METHODS,
        "merge": frozenset({MERGE_METHOD}),
    }
    for method in get_args(Method):
        cfg = SimpleNamespace(spec=SimpleNamespace(method=method))
        recipe = launcher.recipe_for(cfg).__name__.rsplit(".", 1)[1]
        assert method in groups[recipe]
    pretrain = parse_job(yaml.safe_load((EXAMPLES / "pretrain-tiny-llama.yaml").read_text()))
    assert launcher.recipe_for(build_job_config(pretrain)).__name__.endswith(".pretrain")


def test_prepared_data_reports_its_counts_and_pickles() -> None:
    import pickle

    from forgeline_trainer.recipes import finetune, pretrain

    prep = pretrain.PretrainData(
        train=None,
        eval=None,
        tokenizer_files={"tokenizer.json": b"{}"},
        vocab_size=300,
        special={"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2},
        filters={"input": 3, "kept": 3},
        documents={"train": 2, "eval": 1},
        blocks={"train": 5, "eval": 1},
        tokenizer_source="trained",
    )
    assert prep.report() == {"filters": prep.filters, "documents": prep.documents, "blocks": prep.blocks}
    assert pickle.loads(pickle.dumps(prep)) == prep
    sft = finetune.SFTData(None, None, "/base", {}, 0, [1, 2], {"train": 3, "eval": 1, "dropped": 0})
    assert sft.report() == {"examples": {"train": 3, "eval": 1, "dropped": 0}}


def test_scaling_reads_cpu_quantities_strictly() -> None:
    from forgeline_trainer import launcher

    def cfg(cpu: str, workers: int = 2, gpus: int = 0) -> Any:
        return SimpleNamespace(
            spec=SimpleNamespace(resources=SimpleNamespace(cpu=cpu, workers=workers, gpus_per_worker=gpus))
        )

    assert launcher.scaling(cfg("4")) == (2, False, {"CPU": 4.0})
    assert launcher.scaling(cfg("500m")) == (2, False, {"CPU": 1})
    assert launcher.scaling(cfg("8", workers=1, gpus=2)) == (2, True, {"CPU": 4.0, "GPU": 1})
    with pytest.raises(ValueError, match=r"spec\.resources\.cpu"):
        launcher.scaling(cfg("2Gi"))


# -- typed failures --------------------------------------------------------------------------------


def test_trainer_errors_carry_their_reason() -> None:
    from forgeline_trainer import errors, storage

    with pytest.raises(FileNotFoundError) as missing:
        storage.expand("/nonexistent/forgeline/*.jsonl")
    assert errors.reason_for(missing.value) == "DataError"
    with pytest.raises(FileNotFoundError) as no_model:
        models.model_location("/nonexistent/model", None)
    assert errors.reason_for(no_model.value) == "ModelUnavailable"
    hub = OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    assert errors.reason_for(hub) == "ModelUnavailable"
    assert errors.reason_for(MemoryError()) == "OOMKilled"
    assert errors.reason_for(RuntimeError("a bug")) is None  # the operator reads the log


def test_a_workers_own_failure_is_named_through_ray_trains_wrapper() -> None:
    import torch
    from ray.train import WorkerGroupError

    from forgeline_trainer import errors

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert errors.reason_for(WorkerGroupError("m", {0: RuntimeError("x"), 1: oom})) == "OOMKilled"
    assert errors.reason_for(WorkerGroupError("m", {0: RuntimeError("x")})) is None


# -- preflight and storage faults -------------------------------------------------------------------


def _job_config(tmp_path: Path, **paths: str) -> Any:
    """pretrain-tiny-llama's job config with its relative paths under tmp_path (examples/ linked)."""
    (tmp_path / "examples").symlink_to(EXAMPLES)
    job = parse_job(yaml.safe_load((EXAMPLES / "pretrain-tiny-llama.yaml").read_text()))
    cfg = build_job_config(job, work_dir=str(tmp_path))
    return cfg.model_copy(update={"paths": cfg.paths.model_copy(update=paths)}) if paths else cfg


def _solo() -> RuntimeInfo:
    return RuntimeInfo(rank=0, world=1, local_rank=0, on_gpu=False)


def test_preflight_passes_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch  # noqa: F401 - imported already on a Ray Train worker: not part of the figure

    from forgeline_trainer import preflight

    cfg = _job_config(tmp_path)
    seconds = preflight.run(cfg, _solo())
    (record,) = parse_records(capsys.readouterr().out)
    assert record["message"] == "preflight passed" and record["seconds"] == pytest.approx(seconds, abs=1e-3)
    assert seconds < 1
    # the probe files are gone; the locations exist (training writes there next)
    assert (tmp_path / cfg.paths.checkpoints).is_dir() and (tmp_path / cfg.paths.output).is_dir()
    assert [p for p in (tmp_path / "runs").rglob("*") if p.is_file()] == []


def test_preflight_names_the_unwritable_checkpoint_location(tmp_path: Path) -> None:
    from forgeline_trainer import errors, preflight

    from .conftest import tmpfs

    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        cfg = _job_config(tmp_path, checkpoints=str(ro / "ckpt"))
        with pytest.raises(errors.PreflightFailed) as failed:
            preflight.run(cfg, _solo())
    assert failed.value.check == "checkpoint storage" and failed.value.rank == 0
    assert str(failed.value).startswith("preflight check 'checkpoint storage' failed on worker 0: ")
    assert "Read-only file system" in str(failed.value) and "spec.checkpointing.storage" in str(failed.value)
    assert errors.reason_for(failed.value) == "PreflightFailed"


def test_preflight_names_an_unreadable_data_source(tmp_path: Path) -> None:
    from forgeline_trainer import errors, preflight

    cfg = _job_config(tmp_path)
    (tmp_path / "examples").unlink()  # the driver read it; this "worker" cannot see the path
    with pytest.raises(errors.PreflightFailed) as failed:
        preflight.run(cfg, _solo())
    assert failed.value.check == "data" and "examples/data/" in failed.value.detail
    assert "no data at" in failed.value.detail and "every Ray pod" in failed.value.detail


def test_preflight_data_sources_of_both_kinds(tmp_path: Path) -> None:
    from forgeline_trainer import preflight

    pre = build_job_config(parse_job(yaml.safe_load((EXAMPLES / "pretrain-tiny-llama.yaml").read_text())))
    ft = build_job_config(parse_job(yaml.safe_load((EXAMPLES / "finetune-lora-tiny.yaml").read_text())))
    assert [s.uri for s in preflight.data_sources(pre)] == [
        s.uri for s in [*pre.spec.data.sources, *pre.spec.evaluation.sources]
    ]
    assert [s.uri for s in preflight.data_sources(ft)] == [s.uri for s in ft.spec.dataset.sources]
    empty = tmp_path / "saved"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="is empty"):
        preflight.check_data([SimpleNamespace(uri=str(empty), format="saved-dataset")], None)


def test_preflight_gpu_check_on_a_machine_without_gpus() -> None:
    import torch

    from forgeline_trainer import preflight

    preflight.check_gpu(0)  # a CPU job: nothing to check
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match=r"asks for 1 GPU\(s\) per worker but torch sees no usable CUDA"):
        preflight.check_gpu(1)


def test_preflight_collective_sums_and_carries_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    from forgeline_trainer import errors, preflight

    assert preflight.check_collective(_solo(), None) == []  # no process group, one worker: fine
    with pytest.raises(errors.PreflightFailed, match="not initialised"):
        preflight.check_collective(RuntimeInfo(rank=0, world=2, local_rank=0, on_gpu=False), None)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert preflight.check_collective(_solo(), None) == []
        assert preflight.check_collective(_solo(), preflight.CHECKS.index("data")) == [(0, 3)]
        real = dist.all_reduce

        def wrong(t: Any, **kw: Any) -> Any:
            work = real(t, **kw)
            t[1] += 1  # a broken reduction
            return work

        monkeypatch.setattr(dist, "all_reduce", wrong)
        with pytest.raises(errors.PreflightFailed, match=r"gave \[1.0, 2.0\], expected \[1, 1.0\]"):
            preflight.check_collective(_solo(), None)
    finally:
        dist.destroy_process_group()


def test_checkpoint_storage_that_is_not_shared_by_every_node_is_a_storage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Ray Train's own check (a worker does not see the marker its driver wrote: a per-node
    volume, seen on the test cluster with a tmpfs per node) names the URI, its mount and the fix,
    as StorageError (not retried), not a DataError or Unknown."""
    from forgeline_operator.api import parse_job
    from forgeline_operator.api.jobconfig import build_job_config
    from forgeline_trainer import errors
    from forgeline_trainer.launcher import _report_error

    ray_text = (
        "Unable to set up cluster storage with the following settings:\nStorageContext<...>\nCheck that "
        "all nodes in the cluster have read/write access to the configured storage path."
    )
    assert errors.reason_for(RuntimeError(ray_text)) == "StorageError"
    assert errors.reason_for(RuntimeError("Unable to set up the model")) is None
    doc = yaml.safe_load((EXAMPLES / "pretrain-tiny-llama.yaml").read_text())
    doc["metadata"].update(namespace="ns", uid="0" * 16)
    doc["spec"]["output"]["uri"] = "pvc://work/tiny"
    cfg = build_job_config(parse_job(doc))
    _report_error(RuntimeError(ray_text), cfg)
    out = capsys.readouterr().out.splitlines()
    (record,) = [
        json.loads(x.split(progress.PROGRESS_PREFIX, 1)[1]) for x in out if progress.PROGRESS_PREFIX in x
    ]
    assert record["reason"] == "StorageError", record
    assert record["message"].startswith(
        f"writing checkpoints: {cfg.paths.checkpoints} (/mnt/pvc/work/tiny"
    ), record
    assert "is not the same storage on every Ray node" in record["message"]
    assert "ReadWriteMany" in record["message"] and "spec.checkpointing.storage" in record["message"]


def test_storage_faults_map_to_storage_error_by_errno_and_text() -> None:
    import errno

    from forgeline_trainer import errors

    for code, name in [
        (errno.ENOSPC, "ENOSPC"),
        (errno.EDQUOT, "EDQUOT"),
        (errno.EROFS, "EROFS"),
        (errno.EACCES, "EACCES"),
    ]:
        with (
            pytest.raises(errors.StorageError) as err,
            errors.storage_writes("/ckpt", "saving the checkpoint of step 20", "spec.checkpointing.storage"),
        ):
            raise OSError(code, "boom", "/ckpt/run/checkpoint_000001/state.pt")
        text = str(err.value)
        assert f"({name})" in text and "/ckpt/run/checkpoint_000001/state.pt" in text
        assert text.startswith("saving the checkpoint of step 20: ") and "spec.checkpointing.storage" in text
        assert errors.reason_for(err.value) == "StorageError"
    # pyarrow's copy: an OSError whose errno is only in the text; no filename: the location is named
    arrow = OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device")
    assert errors.storage_errno(arrow) == errno.ENOSPC and errors.reason_for(arrow) == "StorageError"
    assert "no space left at /ckpt (ENOSPC)" in str(errors.storage_error(arrow, "/ckpt", "saving", "f"))
    # permission errors are storage faults only where we write (reading one is not)
    assert errors.reason_for(PermissionError(errno.EACCES, "Permission denied")) is None
    with pytest.raises(ValueError), errors.storage_writes("/ckpt", "saving", "spec.checkpointing.storage"):
        raise ValueError("not a storage fault")
    with (
        pytest.raises(FileNotFoundError),
        errors.storage_writes("/c", "saving", "spec.checkpointing.storage"),
    ):
        raise FileNotFoundError(errno.ENOENT, "gone", "/x")


def test_publishing_onto_a_full_volume_is_a_storage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from forgeline_trainer import errors

    from .conftest import tmpfs

    with tmpfs(tmp_path / "full", "size=256k") as full:
        cfg = build_job_config(
            parse_job(yaml.safe_load((EXAMPLES / "pretrain-tiny-llama.yaml").read_text())),
            output=str(full / "model"),
        )
        reporter = _reporter()
        summary = outputs.summary(_worker(cfg), reporter, models.ModelStats(100, 100, 1.0), {})

        def save_model(out: Path) -> None:
            (out / "model.safetensors").write_bytes(b"w" * 1_000_000)

        capsys.readouterr()
        with pytest.raises(errors.StorageError) as err:
            outputs.publish(cfg, save_model, {}, summary, reporter, "tiny")
    assert str(err.value).startswith("publishing the output: no space left at ")
    assert str(full / "model") in str(err.value) and "spec.output.uri" in str(err.value)
    assert not any(
        r["type"] == "done" for r in parse_records(capsys.readouterr().out)
    )  # never a silent success


def test_preflight_and_storage_failures_end_the_ray_train_run_at_once() -> None:
    import errno
    import pickle

    from ray.train import ControllerError, WorkerGroupError

    from forgeline_trainer import errors

    own = errors.PreflightFailed("output storage", 1, "read-only")
    seen = errors.PreflightFailed("output storage", 1, "reported by worker 1")
    assert pickle.loads(pickle.dumps(own)).__dict__ == own.__dict__  # crosses Ray's process boundary
    assert str(errors.PreflightFailed("checkpoint storage", None, "x")).endswith("failed on the driver: x")
    assert errors.not_retried({0: seen, 1: own}) is own  # the failing worker's own words
    assert errors.not_retried({0: RuntimeError("bug")}) is None  # Ray Train retries these
    full = OSError(errno.ENOSPC, "No space left on device")
    assert errors.not_retried({0: RuntimeError("x"), 1: full}) is full
    # Ray Train raises a ControllerError around what the stop_retrying callback raised
    assert errors.reason_for(ControllerError(own)) == "PreflightFailed"
    assert errors.reason_for(ControllerError(WorkerGroupError("m", {0: full}))) == "StorageError"
    assert errors.root_cause(ControllerError(own)) is own


def test_the_error_record_of_preflight_and_storage_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import errno

    from ray.train import ControllerError, WorkerGroupError

    from forgeline_trainer import errors, launcher

    cfg = _job_config(tmp_path, checkpoints=str(tmp_path / "ckpt"))
    launcher._report_error(ControllerError(errors.PreflightFailed("data", 1, "no data at /d")), cfg)
    launcher._report_error(WorkerGroupError("m", {0: OSError("[errno 28] No space left on device")}), cfg)
    launcher._report_error(ControllerError(OSError(errno.EROFS, "Read-only file system")), cfg)
    pre, full, ro = parse_records(capsys.readouterr().out)
    assert isinstance(pre.pop("time"), float)
    assert pre == {
        "type": "error",
        "message": "preflight check 'data' failed on worker 1: no data at /d",
        "reason": "PreflightFailed",
    }
    assert full["reason"] == "StorageError" and full["message"].startswith(
        f"writing checkpoints: no space left at {tmp_path / 'ckpt'} (ENOSPC) — fix: free space"
    )
    assert ro["reason"] == "StorageError" and "(EROFS)" in ro["message"]


# -- checkpoints: discovery, completeness, order; graceful preemption --------------------------------


def test_checkpoint_directories_are_named_by_step() -> None:
    from forgeline_trainer import checkpoints as C

    assert C.dir_name(40) == "checkpoint_step_00000040"
    taken = {"checkpoint_step_00000040", "checkpoint_step_00000040_1"}
    assert C.dir_name(40, taken) == "checkpoint_step_00000040_2"  # written again after a fallback
    assert C.parse_dir_name("checkpoint_step_00000040_2") == (40, 2)
    assert C.parse_dir_name("checkpoint_step_00000040") == (40, 0)
    for other in ("checkpoint_2026-11-24_19-50-00.123456", "checkpoint_manager_snapshot.json", "x"):
        assert C.parse_dir_name(other) is None


def test_a_checkpoint_is_complete_only_with_every_writers_marker_and_files() -> None:
    from forgeline_trainer import checkpoints as C

    ddp = {0: C.marker(40, 0, [0], {"state.pt": 100, "forgeline_state.json": 10})}
    files = {"state.pt": 100, "forgeline_state.json": 10, "forgeline_complete.rank0.json": 80}
    assert C.problem(40, files, ddp) is None
    assert "no completeness marker" in C.problem(40, files, {})
    assert "truncated" in C.problem(40, {**files, "state.pt": 50}, ddp)
    assert "state.pt is missing" in C.problem(40, {"forgeline_state.json": 10}, ddp)
    assert "not 40" in C.problem(40, files, {0: C.marker(20, 0, [0], {})})
    # DeepSpeed: every rank writes shards; complete only when all ranks' markers and files are there.
    zero = {
        r: C.marker(40, r, [0, 1], {f"zero/zero_pp_rank_{r}_mp_rank_00_optim_states.pt": 7}) for r in (0, 1)
    }
    shards = {f"zero/zero_pp_rank_{r}_mp_rank_00_optim_states.pt": 7 for r in (0, 1)}
    assert C.problem(40, shards, zero) is None
    assert "worker 1's files are missing" in C.problem(40, shards, {0: zero[0]})
    assert "written by worker 1" in C.problem(40, {"zero/zero_pp_rank_0_mp_rank_00_optim_states.pt": 7}, zero)
    assert C.problem(40, shards, {0: zero[0], 1: None})  # an unreadable marker


def test_candidates_come_newest_first_and_rays_registered_one_is_kept() -> None:
    from forgeline_trainer import checkpoints as C

    def ok(step: int) -> dict[int, Any]:
        return {0: C.marker(step, 0, [0], {})}

    listing = {
        name: {}
        for name in (
            "checkpoint_step_00000020",
            "checkpoint_step_00000040",
            "checkpoint_step_00000040_1",
            "checkpoint_step_00000060",
        )
    }
    markers = {
        "checkpoint_step_00000020": ok(20),
        "checkpoint_step_00000040": ok(40),
        "checkpoint_step_00000040_1": ok(40),
    }  # 60 has none: its upload did not finish
    cands = C.candidates(listing, markers, registered="checkpoint_step_00000020")
    assert [c.name for c in cands] == [
        "checkpoint_step_00000060",
        "checkpoint_step_00000040_1",
        "checkpoint_step_00000040",
        "checkpoint_step_00000020",
    ]
    assert cands[0].problem and all(c.problem is None for c in cands[1:])
    # A checkpoint Ray Train registered under its own kind of name (older Forgeline) comes last.
    legacy = C.candidates(listing, markers, registered="checkpoint_2026-11-24_19-50-00.123456")
    assert legacy[-1].name.startswith("checkpoint_2026") and legacy[-1].step is None
    # Pruning at a restore: broken ones, and complete ones beyond `keep`; never what Ray references.
    assert C.to_prune(cands, failed={"checkpoint_step_00000040_1"}, keep=1, referenced=set()) == [
        "checkpoint_step_00000060",
        "checkpoint_step_00000040_1",
        "checkpoint_step_00000020",
    ]
    referenced = {"checkpoint_step_00000020", "checkpoint_step_00000060"}
    assert C.to_prune(cands, failed=set(), keep=2, referenced=referenced) == []


def test_run_store_finds_a_truncated_checkpoint_in_real_storage(tmp_path: Path) -> None:
    import pyarrow.fs as pafs

    from forgeline_trainer import checkpoints as C

    for step in (20, 40):
        d = tmp_path / "run" / C.dir_name(step)
        d.mkdir(parents=True)
        (d / "state.pt").write_bytes(b"x" * (1000 + step))
        (d / "forgeline_state.json").write_text("{}")
        C.write_marker(d, step, 0, [0])
    (tmp_path / "run" / "checkpoint_manager_snapshot.json").write_text("{}")
    newest = tmp_path / "run" / C.dir_name(40) / "state.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    store = C.RunStore(pafs.LocalFileSystem(), str(tmp_path / "run"))
    listing = store.listing()
    assert set(listing) == {"checkpoint_step_00000020", "checkpoint_step_00000040"}
    markers = {name: store.markers(name, files) for name, files in listing.items()}
    cands = C.candidates(listing, markers, None)
    assert [c.step for c in cands] == [40, 20]
    assert cands[0].problem == "state.pt is 100 bytes, 1040 were written (truncated or overwritten)"
    assert cands[1].problem is None
    with store.local_dir(cands[1].name) as d:
        assert (d / "state.pt").stat().st_size == 1020
    store.delete(cands[0].name)
    assert set(store.listing()) == {"checkpoint_step_00000020"}
    assert C.RunStore(pafs.LocalFileSystem(), str(tmp_path / "absent")).listing() == {}


def test_sigterm_is_recorded_not_fatal_and_a_late_second_one_falls_back(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import os
    import signal
    import time

    from forgeline_trainer import preemption

    original = signal.getsignal(signal.SIGTERM)
    calls: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))  # stands in for Ray's
    try:
        preemption._reset_for_tests()
        assert preemption.install(0.2) is None  # pytest runs tests on the main thread
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not preemption.requested() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert preemption.requested() and calls == []  # recorded; the process lives on
        os.kill(os.getpid(), signal.SIGTERM)  # within the grace period: still ours
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)  # after it: the previous handler (Ray's: exit)
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls == [signal.SIGTERM]
        assert preemption.checkpoint_written() > 0.3
        late = [r for r in parse_records(capsys.readouterr().out) if r["type"] == "event"]
        assert late and late[0]["message"].startswith("preemption grace period ran out")
        assert late[0]["grace_period_seconds"] == 0.2
    finally:
        signal.signal(signal.SIGTERM, original)
        preemption._reset_for_tests()


def test_a_drained_ray_node_is_a_preemption_though_no_sigterm_reached_the_worker(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In a KubeRay pod the kubelet's SIGTERM goes to `ray start --block`, which drains its node;
    Ray Train marks every worker of the group (mark_preempt). That mark is a preemption request:
    rank 0 reports the checkpoint, every rank raises Preempted naming the drained ranks."""
    from ray.train.v2._internal.execution import context as train_context
    from ray.train.v2.api.preemption import PreemptionInfo

    from forgeline_trainer import preemption
    from forgeline_trainer.errors import Preempted

    holder = SimpleNamespace(preemption_context=SimpleNamespace(preemption_info=None))
    monkeypatch.setattr(train_context, "get_train_context", lambda: holder)
    preemption._reset_for_tests()
    try:
        assert preemption.drain_notice() is None and not preemption.requested()
        deadline_ms = int((time.time() + 30) * 1000)
        holder.preemption_context.preemption_info = PreemptionInfo(deadline_ms, {"node-b": [1]})
        assert preemption.drain_notice() == {"nodes": ["node-b"], "ranks": [1], "deadline_ms": deadline_ms}
        assert preemption.requested()
        with pytest.raises(Preempted, match=r"rank\(s\) \[1\] is draining.*checkpoint written at step 37"):
            preemption.stop(37, 0)
        (event,) = [r for r in parse_records(capsys.readouterr().out) if r["type"] == "event"]
        assert (
            event["step"] == 37
            and event["drained_ranks"] == [1]
            and event["signal"].startswith("Ray node drain")
        )
        assert (
            0 <= event["seconds_to_checkpoint"] < 5
            and 25 < event["seconds_left_before_the_drain_deadline"] <= 30
        )
    finally:
        preemption._reset_for_tests()


def test_a_preempted_worker_makes_the_error_record_say_preempted(capsys: pytest.CaptureFixture[str]) -> None:
    from ray.train import WorkerGroupError

    from forgeline_trainer import launcher
    from forgeline_trainer.errors import Preempted

    failure = WorkerGroupError("m", {0: Preempted("checkpoint written at step 22"), 1: Preempted("x")})
    launcher._report_error(failure)
    record = parse_records(capsys.readouterr().out)[-1]
    assert record["type"] == "error" and record["reason"] == "Preempted"
    assert "step 22" in record["message"]


# -- TRL recipes: graceful preemption and resume (hf_trainer.py), a real transformers Trainer ----


def _signalled() -> None:
    """What preemption's SIGTERM handler records (without its grace-period timer, which would
    print into a later test's output)."""
    import time

    from forgeline_trainer import preemption

    preemption._state["at"] = time.monotonic()
    preemption._requested.set()


def _tiny_trainer(out: Path, steps: int, *callbacks: Any) -> Any:
    import torch
    from transformers import Trainer, TrainingArguments

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Linear(4, 1)

        def forward(self, x: Any, labels: Any) -> dict[str, Any]:
            return {"loss": torch.nn.functional.mse_loss(self.w(x).squeeze(-1), labels)}

    torch.manual_seed(0)
    rows = [{"x": torch.randn(4), "labels": torch.randn(())} for _ in range(64)]
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=2,
        save_strategy="steps",
        save_steps=1000,  # no interval checkpoint before the last step
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    return Trainer(model=Tiny(), args=args, train_dataset=rows, callbacks=list(callbacks))


class _Steps:
    """Records the Trainer's step ends and saves (stands in for hf_trainer.ReportCallback, which
    comes before PreemptionCallback in the same way)."""

    def __init__(self, signal_at: int | None = None) -> None:
        from transformers import TrainerCallback

        outer = self

        class Cb(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if state.global_step + 1 == outer.signal_at:
                    _signalled()  # SIGTERM arrives during this step

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                outer.ended.append(state.global_step)

            def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                outer.saved.append(state.global_step)

        self.signal_at, self.ended, self.saved, self.callback = signal_at, [], [], Cb()


def test_sigterm_in_a_trl_recipe_saves_at_that_step_raises_preempted_and_resumes_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real transformers Trainer with hf_trainer.PreemptionCallback: SIGTERM during step 3 of 6 →
    step 3 finishes, the Trainer saves checkpoint-3 (reported first: the callback before it sees
    the save), then Preempted; a new Trainer resumed from checkpoint-3 runs steps 4–6."""
    from forgeline_trainer import hf_trainer, preemption
    from forgeline_trainer.errors import Preempted

    preemption._reset_for_tests()
    try:
        seen = _Steps(signal_at=3)
        trainer = _tiny_trainer(tmp_path, 6, seen.callback, hf_trainer.PreemptionCallback(rank=0))
        with pytest.raises(Preempted, match="checkpoint written at step 3"):
            trainer.train()
        assert seen.ended == [1, 2, 3] and seen.saved == [3]
        state = json.loads((tmp_path / "checkpoint-3/trainer_state.json").read_text())
        assert state["global_step"] == 3
        (event,) = [r for r in parse_records(capsys.readouterr().out) if r["type"] == "event"]
        assert event["message"] == "preempted: checkpoint written, stopping"
        assert event["step"] == 3 and event["rank"] == 0 and event["seconds_to_checkpoint"] < 120

        preemption._reset_for_tests()  # the next attempt: a new worker process
        again = _Steps()
        resumed = _tiny_trainer(tmp_path / "2", 6, again.callback, hf_trainer.PreemptionCallback(rank=0))
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
        assert again.ended == [4, 5, 6] and again.saved == [6]
    finally:
        preemption._reset_for_tests()


def test_a_trl_worker_stops_when_another_was_signalled_and_not_at_the_last_step() -> None:
    from transformers import TrainerControl, TrainerState

    from forgeline_trainer import hf_trainer, preemption
    from forgeline_trainer.errors import Preempted

    preemption._reset_for_tests()
    try:
        # Another worker got SIGTERM: the all-reduce says so, this one saves and stops too (silently).
        cb = hf_trainer.PreemptionCallback(rank=1, agree=lambda n: 1)
        state, control = TrainerState(global_step=7, max_steps=20), TrainerControl()
        control = cb.on_step_end(None, state, control)
        assert control.should_save and control.should_training_stop and cb.stopping_at == 7
        with pytest.raises(Preempted, match="step 7"):
            cb.on_save(None, state, control)
        # Nobody was signalled: nothing changes.
        quiet = hf_trainer.PreemptionCallback(rank=0, agree=lambda n: n)
        control = quiet.on_step_end(None, state, TrainerControl())
        assert not control.should_save and not control.should_training_stop
        quiet.on_save(None, state, control)  # an interval checkpoint: no raise
        # SIGTERM at the last step: the Trainer saves it anyway and training ends normally.
        _signalled()
        last = hf_trainer.PreemptionCallback(rank=0, agree=lambda n: n)
        state = TrainerState(global_step=20, max_steps=20)
        control = last.on_step_end(None, state, TrainerControl())
        assert last.stopping_at is None and not control.should_training_stop
        last.on_save(None, state, control)
        assert preemption._saved.is_set()  # a late grace-period timer then stays quiet
    finally:
        preemption._reset_for_tests()


def test_trl_checkpoints_carry_every_ranks_marker_and_resume_takes_the_newest_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hf_trainer.ReportCallback as Ray Train would store it (two ranks' reports merged into one
    directory), and restore's choice: step 12 lacks rank 1's files, so step 8 is taken."""
    import shutil

    import pyarrow.fs as pafs
    import ray.train
    from transformers import TrainerState

    from forgeline_trainer import checkpoints as C
    from forgeline_trainer import hf_trainer

    storage = tmp_path / "run"

    def report(metrics: dict[str, Any], checkpoint: Any, checkpoint_dir_name: str) -> None:
        shutil.copytree(checkpoint.path, storage / checkpoint_dir_name, dirs_exist_ok=True)

    monkeypatch.setattr(ray.train, "report", report)
    reporter = progress.Reporter("j", "ns", "FineTuneJob", 20, 1, 1.0, 0.0, is_chief=False)
    reporter.history = [{"step": 1, "loss": 2.0, "learning_rate": 0.1}]
    for step, ranks in ((8, (0, 1)), (12, (0,))):
        for rank in ranks:  # each rank's own output_dir: rank 0 the model, every rank its RNG state
            out = tmp_path / f"out{rank}"
            hf = out / f"checkpoint-{step}"
            hf.mkdir(parents=True)
            (hf / f"rng_state_{rank}.pth").write_bytes(b"r" * (10 + rank))
            if rank == 0:
                (hf / "model.safetensors").write_bytes(b"m" * 100)
                (hf / "trainer_state.json").write_text(json.dumps({"global_step": step}))
            cb = hf_trainer.ReportCallback(reporter, rank, 2)
            cb.on_save(SimpleNamespace(output_dir=str(out)), TrainerState(global_step=step), None)
    store = C.RunStore(pafs.LocalFileSystem(), str(storage))
    listing = store.listing()
    assert sorted(listing["checkpoint_step_00000008"]) == [
        "checkpoint/model.safetensors",
        "checkpoint/rng_state_0.pth",
        "checkpoint/rng_state_1.pth",
        "checkpoint/trainer_state.json",
        "forgeline_complete.rank0.json",
        "forgeline_complete.rank1.json",
        "forgeline_state.json",
    ]
    markers = {name: store.markers(name, files) for name, files in listing.items()}
    cands = C.candidates(listing, markers, None)
    assert [(c.step, c.problem) for c in cands] == [
        (12, "worker 1's files are missing (no marker of rank 1, of writers [0, 1])"),
        (8, None),
    ]
    reporter.is_chief = True
    assert hf_trainer.newest_complete(cands, reporter).name == "checkpoint_step_00000008"
    local = store.download("checkpoint_step_00000008", tmp_path / "scratch")
    assert hf_trainer._trainer_step(local / hf_trainer.HF_DIR, None) == 8
    assert json.loads((local / C.META).read_text())["history"] == reporter.history


def test_the_trl_scratch_directory_is_removed_when_the_run_ends() -> None:
    from forgeline_trainer import hf_trainer

    with pytest.raises(RuntimeError), hf_trainer.scratch_dir() as scratch:
        (scratch / "trainer/checkpoint-3").mkdir(parents=True)
        raise RuntimeError("preempted, say")
    assert not scratch.exists()
    spec = SimpleNamespace(
        training=SimpleNamespace(
            micro_batch_size=2,
            learning_rate=1e-3,
            weight_decay=0.0,
            adam_beta1=0.9,
            adam_beta2=0.95,
            grad_clip=1.0,
            warmup_steps=0,
            schedule="cosine",
            seed=1,
        ),
        checkpointing=SimpleNamespace(interval_steps=10, keep=2),
        optimizer=lambda: "adafactor",
    )
    args = hf_trainer.common_args(spec, False, False, optim.batch_plan(4, 2, 1), 5, Path("/x"))
    assert args["output_dir"] == "/x/trainer" and args["optim"] == "adafactor"


def test_preflight_collective_between_two_real_processes(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from .preflight_workers import collective_worker

    results = mp.get_context("fork").SimpleQueue()  # fork: no re-import in the children
    args = (str(tmp_path / "store"), results)
    mp.start_processes(collective_worker, args=args, nprocs=2, join=True, start_method="fork")
    (_, zero), (_, one) = sorted([results.get(), results.get()])
    assert zero[:2] == one[:2] == [[], [(1, 3)]]  # both workers learn that worker 1 failed check 3
    check, rank, detail, seconds = zero[2]
    assert (check, rank) == ("collective", 0) and detail.startswith("an all-reduce over 2 workers (gloo) did")
    assert 1 <= seconds < 1.9  # bounded by FORGELINE_PREFLIGHT_TIMEOUT_S


def _standalone_examples() -> list[str]:
    """Every document of the shipped examples that needs no earlier job (`fromJob` ones read
    outputs that exist only once their upstream job has run): `stem` or `stem[index]`."""
    found = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        for i, doc in enumerate(docs):
            if not parse_job(doc).upstream_refs():
                found.append(path.stem if len(docs) == 1 else f"{path.stem}[{i}]")
    return found


@pytest.mark.parametrize("example", _standalone_examples())
def test_preflight_passes_for_every_shipped_example(tmp_path: Path, example: str) -> None:
    """Every example's data sources, checkpoint and output locations pass the checks a worker runs."""
    from forgeline_trainer import preflight

    (tmp_path / "examples").symlink_to(EXAMPLES)
    stem, _, index = example.partition("[")
    docs = [d for d in yaml.safe_load_all((EXAMPLES / f"{stem}.yaml").read_text()) if d]
    cfg = build_job_config(parse_job(docs[int(index.rstrip("]") or 0)]), work_dir=str(tmp_path))
    assert preflight.data_sources(cfg)
    preflight.run(cfg, _solo())


def test_mfu_peak_is_the_nodes_measured_once_not_each_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver measures the node once with all its cores (FORGELINE_CPU_PEAK_PER_CORE); a
    worker's peak is its share, so two workers probing at once can no longer halve the peak and
    double the MFU."""
    from forgeline_trainer import progress

    monkeypatch.setenv(progress.CPU_PEAK_ENV, "5e10")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    peak, source = progress.device_peak_flops()
    assert peak == 1e11 and "measured once before training on all its cores" in source
    measured = progress.node_cpu_peak_per_core(1)
    assert 1e8 < measured < 1e13  # a real fp32 matmul on this CPU


def test_a_driver_in_a_pod_with_a_smaller_cpu_limit_leaves_the_peak_to_its_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KubeRay's head pod (500m) measured the node's peak throttled and the workers' MFU came out
    at 1.02 (CI, the e2e pretraining example): the pod's CFS quota is read (cgroup v1 and v2), and a
    driver whose limit is below the workers' cores leaves the probe to each worker."""
    from forgeline_trainer import progress

    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert progress.cpu_quota_cores(v1) == 0.5
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert progress.cpu_quota_cores(v1) is None
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert progress.cpu_quota_cores(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert progress.cpu_quota_cores(v2) is None
    assert progress.cpu_quota_cores(tmp_path / "none") is None
    monkeypatch.setattr(progress, "cpu_quota_cores", lambda: 0.5)
    assert not progress.driver_can_probe_for_workers(2)
    monkeypatch.setattr(progress, "cpu_quota_cores", lambda: 2.0)
    assert progress.driver_can_probe_for_workers(2) and not progress.driver_can_probe_for_workers(3)
    monkeypatch.setattr(progress, "cpu_quota_cores", lambda: None)
    assert progress.driver_can_probe_for_workers(64)


def test_the_node_peak_is_measured_once_per_node_and_kept_for_a_day(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver's CPU peak probe (0.6 s before every CPU job's first step) runs once per node:
    the next job reads it back; a stale or unreadable cache is measured again; '' turns it off."""
    from forgeline_trainer import progress

    cache = tmp_path / "sub" / "cpu-peak.json"
    monkeypatch.setenv(progress.CPU_PEAK_CACHE_ENV, str(cache))
    first = progress.cached_node_cpu_peak_per_core(1)
    assert 1e8 < first < 1e13
    (key, entry), *_ = json.loads(cache.read_text()).items()
    assert "threads" in key and entry["per_core"] == first
    cache.write_text(json.dumps({key: {**entry, "per_core": 123.0}}))
    assert progress.cached_node_cpu_peak_per_core(1) == 123.0  # read back, not measured
    assert progress.cached_node_cpu_peak_per_core(2) != 123.0  # another key: measured
    cache.write_text(json.dumps({key: {"per_core": 123.0, "measured_at": 0}}))
    assert progress.cached_node_cpu_peak_per_core(1) > 1e8  # a day old: measured again
    cache.write_text(json.dumps({key: {"per_core": "fast", "measured_at": time.time()}}))
    assert progress.cached_node_cpu_peak_per_core(1) > 1e8  # an entry it can't read: measured
    cache.write_text("{not json")
    assert progress.cached_node_cpu_peak_per_core(1) > 1e8
    assert json.loads(cache.read_text())[key]["per_core"] > 1e8  # and rewritten
    monkeypatch.setenv(progress.CPU_PEAK_CACHE_ENV, "")
    cache.unlink()
    assert progress.cached_node_cpu_peak_per_core(1) > 1e8 and not cache.exists()


def test_eval_intervals_match_the_textbook_and_small_evals_are_flagged(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The 95% half-widths agree with numpy's sample statistics; an eval under 2,000 held-out tokens
    gets one warning event naming what to change; a metric with no value is left out."""
    from forgeline_trainer import evaluation

    rng = np.random.default_rng(0)
    x = rng.exponential(2.0, size=500)
    half = evaluation.mean_ci95(float(x.mean()), float((x**2).mean()), len(x))
    assert half == pytest.approx(1.96 * x.std(ddof=1) / np.sqrt(len(x)), rel=1e-9)
    assert evaluation.proportion_ci95(0.5, 100) == pytest.approx(0.098)
    assert evaluation.mean_ci95(1.0, 1.0, 1) is None and evaluation.proportion_ci95(0.5, 0) is None
    # 4x the tokens, half the interval
    assert evaluation.proportion_ci95(0.3, 400) == pytest.approx(evaluation.proportion_ci95(0.3, 100) / 2)

    r = _reporter()
    capsys.readouterr()
    r.evaluation(2, {"eval_loss": 2.0, "eval_loss_ci95": 0.4, "accuracy_ci95": None, "eval_tokens": 166.0})
    r.evaluation(4, {"eval_loss": 1.9, "eval_loss_ci95": 0.4, "eval_tokens": 166.0})
    records = parse_records(capsys.readouterr().out)
    evals = [x for x in records if x["type"] == "eval"]
    assert "accuracy_ci95" not in evals[0] and evals[0]["eval_tokens"] == 166.0
    warnings = [x for x in records if x["type"] == "event" and "too small" in x["message"]]
    assert len(warnings) == 1, warnings
    assert "166 held-out tokens" in warnings[0]["message"] and "±0.4" in warnings[0]["message"]
    assert "spec.evaluation.maxBatches" in warnings[0]["message"]
    r.evaluation(6, {"eval_loss": 1.8, "eval_tokens": 4096.0})
    assert not [x for x in parse_records(capsys.readouterr().out) if x["type"] == "event"]


def test_a_gpu_the_node_advertises_but_torch_cannot_use_names_the_pod_and_its_node() -> None:
    """The driver's GPU check (preflight.gpu_nodes, run for real on the test cluster's GPU node in
    tests/test_kube_e2e.py): its verdict on one node's report."""
    import pickle

    from forgeline_trainer import preflight

    report = {
        "pod": "gpu-llama-tj-train-worker-b9m79",
        "node": "forgeline-gpu",
        "ip": "10.160.1.2",
        "ray_gpus": 1,
        "visible": "0",
        "usable": False,
        "count": 0,
        "device_files": [],
        "torch": "2.13.0",
        "cuda": "13.0",
    }
    failure = preflight.gpu_failure(report)
    assert failure is not None and failure.reason == "PreflightFailed" and failure.check == "gpu"
    text = str(failure)
    assert "failed on worker pod gpu-llama-tj-train-worker-b9m79 on node forgeline-gpu (10.160.1.2)" in text
    assert "torch sees no usable CUDA device" in text and "no /dev/nvidia* device files" in text
    assert "fix:" in text and "spec.resources.nodePool" in text
    assert pickle.loads(pickle.dumps(failure)).__dict__ == failure.__dict__
    assert preflight.gpu_failure({**report, "usable": True, "count": 1}) is None
    fewer = preflight.gpu_failure({**report, "usable": True, "count": 1, "ray_gpus": 2})
    assert fewer is not None and "torch sees only 1 CUDA device(s)" in str(fewer)


def test_a_published_output_is_readable_by_the_volumes_group(tmp_path: Path) -> None:
    """The model is written in a private temporary directory (0700, some files 0600); published
    on a shared volume it gets the modes the umask gives, so a serving pod in the group reads it."""
    import os

    from forgeline_trainer import storage

    src = tmp_path / "private"
    src.mkdir(mode=0o700)
    (src / "model.safetensors").write_bytes(b"w")
    (src / "model.safetensors").chmod(0o600)
    (src / "sub").mkdir(mode=0o700)
    (src / "sub" / "x").write_text("x")
    old = os.umask(0o022)
    try:
        storage.publish_dir(src, str(tmp_path / "out"))
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert (out / "model.safetensors").read_bytes() == b"w"
    assert {oct(p.stat().st_mode & 0o777) for p in (out, out / "sub")} == {"0o755"}
    assert {oct(p.stat().st_mode & 0o777) for p in (out / "model.safetensors", out / "sub" / "x")} == {
        "0o644"
    }


def test_relative_paths_resolve_in_the_images_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On KubeRay, Ray runs the job in a session directory of its own, so `examples/data/...`
    (carried by the trainer image) resolved there and was not found (the first real-pod run:
    PreflightFailed 'no data at /tmp/ray/session_.../artifacts/.../examples/data/corpus.jsonl').
    The image names its working directory; a job's own workDir still wins."""
    from forgeline_trainer import storage

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FORGELINE_WORK_DIR", raising=False)
    assert storage.resolve("examples/data/x.jsonl") == str(tmp_path / "examples/data/x.jsonl")
    monkeypatch.setenv("FORGELINE_WORK_DIR", "/home/ray/forgeline")
    assert storage.resolve("examples/data/x.jsonl") == "/home/ray/forgeline/examples/data/x.jsonl"
    assert storage.resolve("examples/data/x.jsonl", "/w") == "/w/examples/data/x.jsonl"
    assert storage.resolve("pvc://work/out") == "/mnt/pvc/work/out"


# -- optimizers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit", "adafactor"])
def test_the_step_loops_build_what_transformers_trainer_builds_for_the_same_optim(name: str) -> None:
    """build_optimizer (the pretraining and PEFT step loops) and the TRL recipes' `optim`
    (HF_OPTIM) give the same optimizer class, learning rate and betas; one step trains."""
    import torch
    from transformers import Trainer, TrainingArguments

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.LayerNorm(128), torch.nn.Linear(128, 4))
    spec = FineTuneOptimization(maxSteps=1, learningRate=1e-3, weightDecay=0.01, optimizer=name)
    opt = optim.build_optimizer(model, spec, name)
    args = TrainingArguments(
        output_dir="/tmp/forgeline-hf-optim",
        optim=optim.HF_OPTIM[name],
        learning_rate=spec.learning_rate,
        adam_beta1=spec.adam_beta1,
        adam_beta2=spec.adam_beta2,
        use_cpu=True,
        report_to="none",
    )
    hf_class, hf_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    assert isinstance(opt, hf_class), (type(opt), hf_class)
    group = opt.param_groups[0]
    assert group["lr"] == hf_kwargs["lr"] and group["weight_decay"] == 0.01
    if "betas" in hf_kwargs:
        assert tuple(group["betas"]) == tuple(hf_kwargs["betas"])
    if "optim_bits" in hf_kwargs:  # bitsandbytes: 8- or 32-bit state, paged or not
        assert (opt.args.optim_bits, opt.is_paged) == (hf_kwargs["optim_bits"], hf_kwargs["is_paged"])
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(8, 64)).pow(2).mean().backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert optim.state_bytes(opt) > 0


def test_optimizer_state_bytes_count_a_shared_storage_once() -> None:
    """bitsandbytes shares one quantisation map between every parameter's state."""
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    opt = optim.build_optimizer(model, FineTuneOptimization(maxSteps=1), "adamw-8bit")
    model(torch.randn(4, 256)).sum().backward()
    opt.step()
    n = 2 * 256 * 256  # two 8-bit moments of each weight; biases (< 4,096 values) keep fp32 state
    expected = 2 * n + 2 * 4 * (n // 256) + 2 * 256 * 8 + 2 * 256 * 4  # + one shared pair of maps
    assert optim.state_bytes(opt) == expected


def test_qlora_as_published_casts_adapters_to_the_compute_dtype() -> None:
    """qlora.py after get_peft_model: LoRA in the compute dtype, embeddings and head too, norms fp32."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules="all-linear"))
    adapters.cast_as_published(model, "bfloat16")
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(dtypes[n] == torch.bfloat16 for n in dtypes if "lora_" in n)
    assert all(dtypes[n] == torch.bfloat16 for n in dtypes if "embed_tokens" in n or "lm_head" in n)
    assert all(dtypes[n] == torch.float32 for n in dtypes if "norm" in n)
    assert adapters.trained_dtype(model) == "bfloat16"
