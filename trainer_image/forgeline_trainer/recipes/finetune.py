"""Supervised fine-tuning: full, LoRA, QLoRA (4-bit NF4 base + LoRA) and prompt tuning (PEFT).

Launch (what the operator and `forgeline run` do):
    # a FineTuneJob with method full|lora|qlora|prompt-tuning
    python -m forgeline_trainer --config job.json

Reads top to bottom:
    prepare()     driver: check the base model, load its tokenizer, read and check the records
                  (alpaca or chat), split off the eval set, tokenize with labels on responses only
    train_loop()  each Ray Train worker, in named phases:
        _setup_data     the tokenized examples from the object store
        _setup_model    base model (4-bit for qlora), PEFT wrapper (adapters.py)
        _setup_engine   optimizer over trainable weights only, DDP or DeepSpeed (optim.setup_engine)
        _restore        resume from the newest checkpoint (trainable weights + optimizer)
        _train          deterministic batches by step; response-token loss; evals and checkpoints
        _finish         rank 0 publishes the adapter (or merged / full weights), tokenizer,
                        metrics.json, loss.png and probe.safetensors (logits of the trained model
                        on a fixed input, to check a reload reproduces it)
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgeline_operator.api.finetune_job import PEFT_METHODS
from forgeline_operator.api.jobconfig import FineTuneJobConfig

from .. import adapters, collective, evaluation, models, optim, outputs, progress, sft_data
from .. import data as D
from ..checkpoints import Checkpointer
from ..errors import DataError, ModelUnavailable
from ..runtime import Worker, fault_injection, train_device

Job = Worker[FineTuneJobConfig]

# -- driver ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SFTData:
    """What `prepare` hands every worker."""

    train: Any
    """Ray object ref of the training examples (list[sft_data.Tokenized])."""
    eval: Any | None
    """Ray object ref of the eval examples (None: no eval set)."""
    base_dir: str
    """The base model, as a local directory (or hub id)."""
    tokenizer_files: dict[str, bytes]
    pad_id: int
    probe_ids: list[int]
    """A fixed prompt whose logits the output keeps (probe.safetensors)."""
    examples: dict[str, int]
    """train / eval / dropped (no response tokens left after truncation)."""

    def report(self) -> dict[str, Any]:
        return {"examples": self.examples}


def prepare(cfg: FineTuneJobConfig, staging: Path) -> SFTData:
    import ray
    from transformers import AutoConfig

    spec, work = cfg.spec, cfg.paths.work_dir
    if not cfg.paths.base_model:
        raise ModelUnavailable("spec.baseModel: no base model resolved")
    base_dir = models.model_location(cfg.paths.base_model, work)
    AutoConfig.from_pretrained(base_dir)  # fails here, not in every worker, if it is no model
    tokenizer = D.load_tokenizer(base_dir)
    tok_dir = staging / "tokenizer"
    tokenizer.save_pretrained(str(tok_dir))
    ds = spec.dataset
    if ds.chat_template:
        tokenizer.chat_template = ds.chat_template
    records = sft_data.read_examples(ds.sources, ds.format, work)

    def tok(rs: list[dict[str, Any]]) -> list[sft_data.Tokenized]:
        return [
            sft_data.tokenize_example(r, ds.format, tokenizer, ds.max_sequence_length, ds.loss_on_prompt)
            for r in rs
        ]

    if spec.evaluation.sources:
        train, held = records, sft_data.read_examples(spec.evaluation.sources, ds.format, work)
        train_tok, eval_tok = tok(train), tok(held)
    else:
        train, held, train_tok, eval_tok = _split_tokenized(records, tok(records), spec.evaluation)
    # Examples whose response was truncated away teach nothing and measure nothing.
    train_tok = [t for t in train_tok if t.response_tokens]
    eval_tok = [t for t in eval_tok if t.response_tokens]
    if not train_tok:
        raise DataError(
            "spec.dataset: no example has response tokens left after truncation; "
            "raise spec.dataset.maxSequenceLength"
        )
    probe_text = sft_data.prompt_of(train[0], ds.format, tokenizer)
    return SFTData(
        train=ray.put(train_tok),
        eval=ray.put(eval_tok) if eval_tok else None,
        base_dir=base_dir,
        tokenizer_files=D.tokenizer_files(tok_dir),
        pad_id=tokenizer.pad_token_id,
        probe_ids=tokenizer(probe_text, add_special_tokens=False)["input_ids"][-64:],
        examples={
            "train": len(train_tok),
            "eval": len(eval_tok),
            "dropped": len(train) + len(held) - len(train_tok) - len(eval_tok),
        },
    )


# -- worker ------------------------------------------------------------------------------------


def train_loop(loop_config: dict[str, Any]) -> None:
    job = Worker.start(loop_config, FineTuneJobConfig)
    prep: SFTData = loop_config["prepared"]
    data = _setup_data(prep)
    model, stats = _setup_model(job, prep)
    eng = _setup_engine(job, model, data)
    reporter = progress.Reporter.for_run(
        job.cfg,
        job.rt,
        total_steps=eng.total_steps,
        tokens_per_step=int(data.avg_tokens * eng.plan.global_batch),
        flops_per_token=stats.flops_per_token,
        extra={"trainable_fraction": round(stats.trainable_fraction, 6), "method": job.cfg.spec.method},
    )
    ckpt = Checkpointer.for_job(job, trainable_only=job.cfg.spec.method in PEFT_METHODS)
    start_step = _restore(job, ckpt, eng, reporter, stats)
    _train(job, data, eng, ckpt, reporter, start_step)
    _finish(job, prep, data, eng, reporter, stats, start_step)
    ckpt.barrier()


@dataclass(frozen=True)
class _Data:
    """This worker's examples: global batches by step, its slice of each."""

    train: list[sft_data.Tokenized]
    eval: list[sft_data.Tokenized]
    """Empty: no eval set."""
    pad_id: int

    @property
    def avg_tokens(self) -> float:
        return sum(len(e.input_ids) for e in self.train) / len(self.train)

    def micro_batch(self, job: Job, eng: optim.TrainEngine, step: int, micro: int) -> dict[str, Any]:
        rt, plan, seed = job.rt, eng.plan, job.cfg.spec.training.seed
        idx = D.worker_slice(
            D.batch_indices(len(self.train), plan.global_batch, step, seed), rt.rank, rt.world
        )
        mine = idx[micro * plan.micro : (micro + 1) * plan.micro]
        return sft_data.collate([self.train[i] for i in mine], self.pad_id, eng.device)


def _setup_data(prep: SFTData) -> _Data:
    import ray

    train = ray.get(prep.train)
    return _Data(train, ray.get(prep.eval) if prep.eval is not None else [], prep.pad_id)


def _setup_model(job: Job, prep: SFTData) -> tuple[Any, models.ModelStats]:
    """The base model on this worker's device, wrapped for the method (adapters.py); its sizes."""
    spec = job.cfg.spec
    model = adapters.load_base(spec, prep.base_dir, train_device())
    if spec.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = adapters.wrap(spec, model, prep.base_dir)
    if spec.adapter_dtype() not in (None, "float32"):
        adapters.cast_as_published(model, spec.adapter_dtype())
    return model, models.finetune_stats(model, spec.dataset.max_sequence_length)


def _setup_engine(job: Job, model: Any, data: _Data) -> optim.TrainEngine:
    t = job.cfg.spec.training
    plan = optim.batch_plan(t.global_batch_size, t.micro_batch_size, job.rt.world)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * len(data.train) / plan.global_batch))
    spec = job.cfg.spec
    return optim.setup_engine(
        model, t, spec.deepspeed, plan, total_steps, job.bf16, job.rt.on_gpu, spec.optimizer()
    )


def _restore(
    job: Job,
    ckpt: Checkpointer,
    eng: optim.TrainEngine,
    reporter: progress.Reporter,
    stats: models.ModelStats,
) -> int:
    """The step to start from (newest checkpoint, resumeFrom, or 0); announces the start."""
    spec = job.cfg.spec
    start_step = ckpt.restore(eng, reporter, spec.checkpointing.resume_from, job.cfg.paths.work_dir)
    reporter.event(
        "training started",
        start_step=start_step,
        total_steps=eng.total_steps,
        method=spec.method,
        parameters=stats.parameters,
        trainable_parameters=stats.trainable,
        quantized_4bit_layers=adapters.count_4bit(eng.model),
        world_size=job.rt.world,
        accumulation=eng.plan.accumulation,
        precision=job.precision,
        optimizer=job.cfg.spec.optimizer(),
        peak_source=reporter.peak_source,
    )
    return start_step


def _train(
    job: Job,
    data: _Data,
    eng: optim.TrainEngine,
    ckpt: Checkpointer,
    reporter: progress.Reporter,
    start_step: int,
) -> None:
    """Train step, record, evaluate if due, checkpoint if due — from start_step to the end."""
    spec, total, global_batch = job.cfg.spec, eng.total_steps, eng.plan.global_batch
    if data.eval and start_step == 0:  # the baseline: the held-out metric before training
        reporter.evaluate(0, lambda: _evaluate(job, data, eng))
    for step in range(start_step, total):
        loss, grad_norm, tokens = _train_step(job, data, eng, step)
        done = step + 1
        reporter.step(
            done,
            loss,
            eng.lr,
            grad_norm=collective.as_float(grad_norm),
            samples=global_batch,
            tokens=tokens,
            epoch=round(done * global_batch / len(data.train), 4),
        )
        every = spec.evaluation.interval_steps
        if data.eval and every and done % every == 0 and done != total:
            reporter.evaluate(done, lambda: _evaluate(job, data, eng))
        ckpt.maybe_save(done, eng, reporter, metrics={"loss": loss})
        fault_injection(job.cfg, done)


def _train_step(job: Job, data: _Data, eng: optim.TrainEngine, step: int) -> tuple[float, Any, int]:
    """One optimizer step: (mean loss over workers, grad norm, tokens over workers)."""
    import torch

    total_loss = torch.zeros((), device=eng.device)
    tokens = torch.zeros((), device=eng.device)
    for micro in range(eng.plan.accumulation):
        batch = data.micro_batch(job, eng, step, micro)
        tokens += int(batch["attention_mask"].sum())
        with eng.autocast():
            loss = eng.net(**batch).loss
        eng.backward(loss)
        total_loss += loss.detach() / eng.plan.accumulation
    grad_norm = eng.optimizer_step(job.cfg.spec.training.grad_clip)
    return collective.mean(total_loss), grad_norm, int(collective.total(tokens))


def _finish(
    job: Job,
    prep: SFTData,
    data: _Data,
    eng: optim.TrainEngine,
    reporter: progress.Reporter,
    stats: models.ModelStats,
    start_step: int,
) -> None:
    """Final eval; rank 0 publishes the adapter (or merged / full weights) and the probe."""
    cfg, total = job.cfg, eng.total_steps
    with reporter.timed("evaluation"):
        final_eval = _evaluate(job, data, eng) if data.eval else {}
    if final_eval:
        reporter.evaluation(total, final_eval)
    if job.rt.rank != 0:
        return
    bare = getattr(eng.model, "module", eng.model)
    saved = "full" if cfg.spec.method == "full" else cfg.spec.output.save or "adapter"
    summary = outputs.summary(
        job,
        reporter,
        stats,
        final_eval,
        **outputs.finetune_fields(cfg, stats, prep.examples, saved),
        quantized_4bit_layers=adapters.count_4bit(bare),
        adapter_dtype=adapters.trained_dtype(bare),
        optimizer_state_bytes=optim.state_bytes(eng.optimizer),
        resumed_from_step=start_step,
        tokens_seen=reporter.tokens_seen,
    )

    def save_model(out: Path) -> None:
        _save_probe(bare, prep.probe_ids, eng.device, out)
        if saved == "merged":
            _save_merged(cfg, bare, prep.base_dir, out)
        else:
            bare.save_pretrained(out, safe_serialization=True)  # PEFT: adapter only; full: all weights

    title = f"{cfg.name} ({cfg.spec.method})"
    outputs.publish(cfg, save_model, prep.tokenizer_files, summary, reporter, title)


# -- helpers -----------------------------------------------------------------------------------


def _split_tokenized(
    records: list[dict[str, Any]], tokenized: list[sft_data.Tokenized], ev: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[sft_data.Tokenized], list[sft_data.Tokenized]]:
    """(train records, held-out records, their tokenized examples): the holdout is sized in
    response tokens (spec.evaluation.holdoutMinTokens), by record hash."""
    keys = [sft_data.record_key(r) for r in records]
    sizes = [t.response_tokens for t in tokenized]
    train_i, held_i = D.holdout_indices(keys, sizes, ev.holdout_fraction, ev.holdout_min_tokens)
    return (
        [records[i] for i in train_i],
        [records[i] for i in held_i],
        [tokenized[i] for i in train_i],
        [tokenized[i] for i in held_i],
    )


def _save_probe(model: Any, probe_ids: list[int], device: Any, out: Path) -> None:
    """probe.safetensors: the trained model's logits on a fixed prompt (a reload must match)."""
    import torch
    from safetensors.torch import save_file

    model.eval()
    probe = torch.tensor([probe_ids], device=device)
    with torch.no_grad():
        logits = model(input_ids=probe).logits[:, -probe.shape[1] :, :].float().cpu()
    save_file({"input_ids": probe.cpu(), "logits": logits.contiguous()}, str(out / "probe.safetensors"))


def _evaluate(job: Job, data: _Data, eng: optim.TrainEngine) -> dict[str, float]:
    """Response-token loss and next-token accuracy, over every worker's slice."""
    rt = job.rt
    return evaluation.response_metrics(
        eng.net,
        data.eval,
        data.pad_id,
        eng.device,
        eng.plan.micro,
        job.cfg.spec.evaluation.max_batches,
        rt.rank,
        rt.world,
    )


def _save_merged(cfg: FineTuneJobConfig, model: Any, base_dir: str, out: Path) -> None:
    """Fold the adapter into full-precision base weights (QLoRA: reload the base unquantised)."""
    if cfg.spec.method == "qlora":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory() as adapter_dir:
            model.save_pretrained(adapter_dir)
            base = AutoModelForCausalLM.from_pretrained(base_dir)
            merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    else:
        merged = model.merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
