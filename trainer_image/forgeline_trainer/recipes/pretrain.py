"""Pretraining and continued pretraining (causal or masked LM), with optional DeepSpeed ZeRO.

Launch (what the operator and `forgeline run` do):
    python -m forgeline_trainer --config job.json        # a TrainingJob's job config

Reads top to bottom:
    prepare()     driver: read → filter → split → tokenizer → pack; fails before any worker starts
    train_loop()  each Ray Train worker, in named phases:
        _setup_data     the packed token blocks from the object store (+ the tokenizer for MLM)
        _setup_model    fresh from a transformers config, or initFrom
        _setup_engine   global batch = workers × micro × accumulation; optimizer, schedule,
                        DDP or DeepSpeed (optim.setup_engine)
        _restore        resume from the newest checkpoint (or resumeFrom)
        _train          deterministic data order by step; progress records, evals and
                        checkpoints at their intervals
        _finish         final eval; rank 0 publishes model + tokenizer + metrics.json + loss.png
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgeline_operator.api.jobconfig import TrainingJobConfig

from .. import collective, evaluation, models, optim, outputs, progress
from .. import data as D
from ..checkpoints import Checkpointer
from ..errors import DataError
from ..runtime import Worker, fault_injection

Job = Worker[TrainingJobConfig]

# -- driver ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainData:
    """What `prepare` hands every worker."""

    train: Any
    """Ray object ref of the training D.TokenBlocks."""
    eval: Any | None
    """Ray object ref of the eval D.TokenBlocks (None: no eval data)."""
    tokenizer_files: dict[str, bytes]
    vocab_size: int
    special: dict[str, int | None]
    """pad/eos/bos token ids, for a fresh model's config."""
    filters: dict[str, int]
    """The quality filters' counts (FilterReport)."""
    documents: dict[str, int]
    blocks: dict[str, int]
    tokenizer_source: str

    def report(self) -> dict[str, Any]:
        return {"filters": self.filters, "documents": self.documents, "blocks": self.blocks}


def prepare(cfg: TrainingJobConfig, staging: Path) -> PretrainData:
    """Everything the workers need that is cheaper to compute once: token blocks and tokenizer."""
    import ray

    spec, work = cfg.spec, cfg.paths.work_dir
    docs = D.read_texts(spec.data.sources, spec.data.text_field, work)
    docs, report = D.apply_filters(docs, spec.data.filters)
    if not docs:
        raise DataError(
            f"spec.data: every document was filtered out ({report.as_dict()}); loosen spec.data.filters"
        )
    tok_dir = staging / "tokenizer"
    tokenizer, tokenizer_source = _tokenizer(cfg, docs, tok_dir)
    ids = D.tokenize(docs, tokenizer)
    if spec.evaluation.sources:
        eval_docs = D.read_texts(spec.evaluation.sources, spec.data.text_field, work)
        train_ids, eval_ids = ids, D.tokenize(eval_docs, tokenizer)
    else:
        ev = spec.evaluation
        train_idx, eval_idx = D.holdout_indices(
            docs, [len(i) + 1 for i in ids], ev.holdout_fraction, ev.holdout_min_tokens
        )
        train_ids, eval_ids = [ids[i] for i in train_idx], [ids[i] for i in eval_idx]
    seq = spec.data.sequence_length
    train_blocks = D.pack(train_ids, tokenizer, seq, spec.data.packing)
    eval_blocks = D.pack(eval_ids, tokenizer, seq, spec.data.packing) if eval_ids else None
    if train_blocks.n == 0:
        raise DataError(
            f"spec.data: {len(train_ids)} documents make no full block of "
            f"{seq} tokens; add data or lower spec.data.sequenceLength"
        )
    return PretrainData(
        train=ray.put(train_blocks),
        eval=ray.put(eval_blocks) if eval_blocks is not None and eval_blocks.n else None,
        tokenizer_files=D.tokenizer_files(tok_dir),
        vocab_size=len(tokenizer),
        special={
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        },
        filters=report.as_dict(),
        documents={"train": len(train_ids), "eval": len(eval_ids)},
        blocks={"train": train_blocks.n, "eval": 0 if eval_blocks is None else eval_blocks.n},
        tokenizer_source=tokenizer_source,
    )


def _tokenizer(cfg: TrainingJobConfig, docs: list[str], tok_dir: Path) -> tuple[Any, str]:
    """(tokenizer saved in tok_dir, where it came from): the spec's, the initFrom model's, or one
    trained on the documents (all of them, held-out ones included: the split is sized in tokens,
    so it needs the tokenizer first; a tokenizer learns a vocabulary, not the held-out text)."""
    tok_spec, work = cfg.spec.data.tokenizer, cfg.paths.work_dir
    if tok_spec.path or tok_spec.hub_id:
        tokenizer = D.load_tokenizer(models.model_location(tok_spec.path or f"hf://{tok_spec.hub_id}", work))
        tokenizer.save_pretrained(str(tok_dir))
        return tokenizer, tok_spec.path or tok_spec.hub_id
    if cfg.paths.base_model:
        tokenizer = D.load_tokenizer(models.model_location(cfg.paths.base_model, work))
        tokenizer.save_pretrained(str(tok_dir))
        return tokenizer, cfg.paths.base_model
    tokenizer = D.train_tokenizer(docs, tok_spec.vocab_size, tok_dir)
    return tokenizer, f"trained byte-level BPE, vocab {len(tokenizer)}"


# -- worker ------------------------------------------------------------------------------------


def train_loop(loop_config: dict[str, Any]) -> None:
    job = Worker.start(loop_config, TrainingJobConfig)
    prep: PretrainData = loop_config["prepared"]
    data = _setup_data(job, prep)
    model, stats = _setup_model(job, prep)
    eng = _setup_engine(job, model)
    reporter = progress.Reporter.for_run(
        job.cfg,
        job.rt,
        total_steps=eng.total_steps,
        tokens_per_step=eng.plan.global_batch * job.cfg.spec.data.sequence_length,
        flops_per_token=stats.flops_per_token,
    )
    ckpt = Checkpointer.for_job(job)
    start_step = _restore(job, ckpt, eng, reporter, stats)
    _train(job, data, eng, ckpt, reporter, start_step)
    _finish(job, prep, data, eng, reporter, stats, start_step)
    ckpt.barrier()


@dataclass(frozen=True)
class _Data:
    """This worker's view of the token blocks: global batches by step, its slice of each."""

    train: D.TokenBlocks
    eval: D.TokenBlocks | None
    masked: bool
    tokenizer: Any
    """For masked LM (the collator masks with its mask token); None for causal LM."""
    mask_probability: float

    def micro_batch(self, job: Job, eng: optim.TrainEngine, step: int, micro: int) -> dict[str, Any]:
        seed, rt, plan = job.cfg.spec.training.seed, job.rt, eng.plan
        idx = D.worker_slice(D.batch_indices(self.train.n, plan.global_batch, step, seed), rt.rank, rt.world)
        mine = idx[micro * plan.micro : (micro + 1) * plan.micro]
        mask_seed = seed * 1_000_003 + step * 997 + rt.rank * 31 + micro
        return self.batch(self.train, mine, mask_seed, eng.device)

    def batch(self, blocks: D.TokenBlocks, idx: Any, seed: int, device: Any) -> dict[str, Any]:
        return _make_batch(blocks, idx, self.masked, self.tokenizer, self.mask_probability, seed, device)


def _setup_data(job: Job, prep: PretrainData) -> _Data:
    import ray

    masked = job.cfg.spec.objective == "masked"
    return _Data(
        train=ray.get(prep.train),
        eval=ray.get(prep.eval) if prep.eval is not None else None,
        masked=masked,
        tokenizer=D.tokenizer_from_files(prep.tokenizer_files) if masked else None,
        mask_probability=job.cfg.spec.mask_probability,
    )


def _setup_model(job: Job, prep: PretrainData) -> tuple[Any, models.ModelStats]:
    """The model (fresh or initFrom) and its sizes."""
    cfg, spec = job.cfg, job.cfg.spec
    masked, seq = spec.objective == "masked", spec.data.sequence_length
    if cfg.paths.base_model:
        model = models.load_pretrained(cfg.paths.base_model, cfg.paths.work_dir, masked=masked)
    else:
        model = models.build_fresh(
            models.fresh_config(spec.model, prep.vocab_size, seq, prep.special), masked
        )
    if spec.deepspeed and spec.deepspeed.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, models.pretrain_stats(model, seq)


def _setup_engine(job: Job, model: Any) -> optim.TrainEngine:
    spec = job.cfg.spec
    plan = optim.batch_plan(_global_batch(spec), spec.training.micro_batch_size, job.rt.world)
    total_steps = _total_steps(spec, plan)
    return optim.setup_engine(
        model, spec.training, spec.deepspeed, plan, total_steps, job.bf16, job.rt.on_gpu, spec.optimizer()
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
        parameters=stats.parameters,
        world_size=job.rt.world,
        accumulation=eng.plan.accumulation,
        precision=job.precision,
        optimizer=job.cfg.spec.optimizer(),
        peak_flops_per_worker=reporter.peak_per_worker,
        peak_source=reporter.peak_source,
        deepspeed_stage=None if spec.deepspeed is None else spec.deepspeed.zero_stage,
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
    spec, total = job.cfg.spec, eng.total_steps
    if data.eval and start_step == 0:  # the baseline: the held-out metric before training
        reporter.evaluate(0, lambda: _evaluate(job, data, eng))
    for step in range(start_step, total):
        t0 = time.perf_counter()
        loss, grad_norm = _train_step(job, data, eng, step)
        done = step + 1
        reporter.step(
            done,
            loss,
            eng.lr,
            grad_norm=collective.as_float(grad_norm),
            samples=eng.plan.global_batch,
            step_seconds=round(time.perf_counter() - t0, 4),
        )
        every = spec.evaluation.interval_steps
        if data.eval is not None and every and done % every == 0 and done != total:
            reporter.evaluate(done, lambda: _evaluate(job, data, eng))
        ckpt.maybe_save(done, eng, reporter, metrics={"loss": loss})
        fault_injection(job.cfg, done)


def _train_step(job: Job, data: _Data, eng: optim.TrainEngine, step: int) -> tuple[float, Any]:
    """One optimizer step over this worker's micro batches: (mean loss over workers, grad norm)."""
    import torch

    total_loss = torch.zeros((), device=eng.device)
    for micro in range(eng.plan.accumulation):
        batch = data.micro_batch(job, eng, step, micro)
        with eng.autocast():
            loss = eng.net(**batch).loss
        eng.backward(loss)
        total_loss += loss.detach() / eng.plan.accumulation
    grad_norm = eng.optimizer_step(job.cfg.spec.training.grad_clip)
    return collective.mean(total_loss), grad_norm


def _finish(
    job: Job,
    prep: PretrainData,
    data: _Data,
    eng: optim.TrainEngine,
    reporter: progress.Reporter,
    stats: models.ModelStats,
    start_step: int,
) -> None:
    """Final eval; rank 0 publishes the model with its tokenizer, metrics.json and loss.png."""
    spec, total = job.cfg.spec, eng.total_steps
    with reporter.timed("evaluation"):
        final_eval = _evaluate(job, data, eng) if data.eval is not None else {}
    if final_eval:
        reporter.evaluation(total, final_eval)
    state_dict = _full_state_dict(eng.engine)
    if job.rt.rank != 0:
        return
    bare = getattr(eng.model, "module", eng.model)
    architecture = bare.config.model_type
    summary = outputs.summary(
        job,
        reporter,
        stats,
        final_eval,
        objective=spec.objective,
        architecture=architecture,
        resumed_from_step=start_step,
        tokens_seen=reporter.tokens_seen,
        optimizer_state_bytes=optim.state_bytes(eng.optimizer),
        filters=prep.filters,
        documents=prep.documents,
        blocks=prep.blocks,
        tokenizer=prep.tokenizer_source,
        deepspeed_zero_stage=None if spec.deepspeed is None else spec.deepspeed.zero_stage,
    )

    def save_model(out: Path) -> None:
        bare.save_pretrained(out, state_dict=state_dict, safe_serialization=True)

    title = f"{job.cfg.name} ({architecture})"
    outputs.publish(job.cfg, save_model, prep.tokenizer_files, summary, reporter, title)


# -- helpers -----------------------------------------------------------------------------------


def _global_batch(spec: Any) -> int | None:
    t = spec.training
    if t.global_batch_tokens is not None:
        return t.global_batch_tokens // spec.data.sequence_length
    return t.global_batch_size


def _total_steps(spec: Any, plan: optim.BatchPlan) -> int:
    if spec.training.max_steps is not None:
        return spec.training.max_steps
    return max(1, spec.training.token_budget // (plan.global_batch * spec.data.sequence_length))


def _make_batch(
    blocks: D.TokenBlocks, idx: Any, masked: bool, tokenizer: Any, mask_prob: float, seed: int, device: Any
) -> dict[str, Any]:
    import numpy as np
    import torch

    ids = torch.from_numpy(blocks.tokens[idx].astype(np.int64))
    lengths = torch.from_numpy(blocks.lengths[idx].astype(np.int64))
    attn = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    if masked:
        from transformers import DataCollatorForLanguageModeling

        torch.manual_seed(seed)  # the same masks again after a resume
        collator = DataCollatorForLanguageModeling(
            tokenizer, mlm=True, mlm_probability=mask_prob, return_tensors="pt"
        )
        special = attn == 0
        inputs, labels = collator.torch_mask_tokens(ids.clone(), special_tokens_mask=special)
        return {
            "input_ids": inputs.to(device),
            "attention_mask": attn.to(device),
            "labels": labels.to(device),
        }
    labels = ids.masked_fill(attn == 0, -100)
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "labels": labels.to(device)}


def _evaluate(job: Job, data: _Data, eng: optim.TrainEngine) -> dict[str, float]:
    """Token-weighted loss over this worker's slice of the eval blocks, summed across workers."""
    import math

    import numpy as np
    import torch

    blocks, rt, micro, device = data.eval, job.rt, eng.plan.micro, eng.device
    if blocks is None:
        return {}
    eng.net.eval()
    mine = np.arange(blocks.n)[rt.rank :: rt.world]
    batches = [mine[i : i + micro] for i in range(0, len(mine), micro)][: job.cfg.spec.evaluation.max_batches]
    # Every worker must run the same number of forwards (ZeRO-3 gathers parameters collectively).
    n_batches = int(collective.maximum(len(batches)))
    loss_sum = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    # per-batch mean losses, for the interval: tokens of one block are not independent samples
    batch_stats = torch.zeros(3, device=device)  # batches, Σ batch loss, Σ batch loss²
    with torch.no_grad():
        for i in range(n_batches):
            idx = (
                batches[i] if i < len(batches) else batches[0] if batches else np.arange(min(micro, blocks.n))
            )
            real = i < len(batches) and len(batches) > 0
            batch = data.batch(blocks, idx, seed=12345 + i, device=device)
            out = eng.net(**batch)
            n = (batch["labels"] != -100).sum()
            if real:
                batch_loss = out.loss.detach().float()
                loss_sum += batch_loss * n
                count += n
                batch_stats += torch.stack([torch.ones_like(batch_loss), batch_loss, batch_loss**2])
    eng.net.train()
    if torch.distributed.is_initialized():
        for t in (loss_sum, count, batch_stats):
            torch.distributed.all_reduce(t)
    loss = (loss_sum / count.clamp(min=1)).item()
    batches_n, batch_sum, batch_sq = (float(x) for x in batch_stats.tolist())
    mean = batch_sum / max(batches_n, 1.0)
    return {
        "eval_loss": loss,
        "eval_loss_ci95": evaluation.mean_ci95(mean, batch_sq / max(batches_n, 1.0), batches_n),
        "perplexity": math.exp(min(loss, 50.0)),
        "eval_tokens": float(count.item()),
    }


def _full_state_dict(engine: Any) -> dict[str, Any] | None:
    """The whole model's weights on rank 0 (ZeRO-3 gathers its shards: every rank must call)."""
    if engine is not None and engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    return None
