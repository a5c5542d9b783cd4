"""Pretraining and continued pretraining (causal or masked LM), with optional DeepSpeed ZeRO.

Launch (what the operator and `forgeline run` do):
    python -m forgeline_trainer --config job.json        # a TrainingJob's job config

Reads top to bottom:
    prepare()     driver: read → filter → split → tokenizer → pack; fails before any worker starts
    train_loop()  each Ray Train worker:
        setup     model (fresh from a transformers config, or initFrom), optimizer, schedule,
                  DDP or DeepSpeed, resume from the newest checkpoint
        train     global batch = workers × micro × accumulation; deterministic data order by step;
                  progress records, evals and checkpoints at their intervals
        cleanup   rank 0 writes model + tokenizer + metrics.json + loss.png to the output URI
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from forgeline_operator.api.jobconfig import TrainingJobConfig, dump_job_config, load_job_config

from .. import collective, models, optim, outputs, progress, storage
from .. import data as D
from ..checkpoints import Checkpointer
from ..runtime import RuntimeInfo, fault_injection, resolve_precision

# -- driver ------------------------------------------------------------------------------------


def prepare(cfg: TrainingJobConfig, staging: Path) -> dict[str, Any]:
    """Everything the workers need that is cheaper to compute once: token blocks and tokenizer."""
    import ray

    spec, work = cfg.spec, cfg.paths.work_dir
    docs = D.read_texts(spec.data.sources, spec.data.text_field, work)
    docs, report = D.apply_filters(docs, spec.data.filters)
    if not docs:
        raise ValueError(
            f"spec.data: every document was filtered out ({report.as_dict()}); loosen spec.data.filters"
        )
    if spec.evaluation.sources:
        train_docs = docs
        eval_docs = D.read_texts(spec.evaluation.sources, spec.data.text_field, work)
    else:
        train_docs, eval_docs = D.holdout_split(docs, spec.evaluation.holdout_fraction)

    tok_dir = staging / "tokenizer"
    tok_spec = spec.data.tokenizer
    if tok_spec.path or tok_spec.hub_id:
        tokenizer = D.load_tokenizer(models.model_location(tok_spec.path or f"hf://{tok_spec.hub_id}", work))
        tokenizer.save_pretrained(str(tok_dir))
        tokenizer_source = tok_spec.path or tok_spec.hub_id
    elif cfg.paths.base_model:
        tokenizer = D.load_tokenizer(models.model_location(cfg.paths.base_model, work))
        tokenizer.save_pretrained(str(tok_dir))
        tokenizer_source = cfg.paths.base_model
    else:
        tokenizer = D.train_tokenizer(train_docs, tok_spec.vocab_size, tok_dir)
        tokenizer_source = f"trained byte-level BPE, vocab {len(tokenizer)}"
    seq = spec.data.sequence_length
    train_blocks = D.tokenize_and_pack(train_docs, tokenizer, seq, spec.data.packing)
    eval_blocks = D.tokenize_and_pack(eval_docs, tokenizer, seq, spec.data.packing) if eval_docs else None
    if train_blocks.n == 0:
        raise ValueError(
            f"spec.data: {len(train_docs)} documents make no full block of "
            f"{seq} tokens; add data or lower spec.data.sequenceLength"
        )
    return {
        "train": ray.put(train_blocks),
        "eval": ray.put(eval_blocks) if eval_blocks is not None and eval_blocks.n else None,
        "tokenizer_files": {p.name: p.read_bytes() for p in tok_dir.iterdir() if p.is_file()},
        "vocab_size": len(tokenizer),
        "special": {
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        },
        "mask_token_id": tokenizer.mask_token_id,
        "filters": report.as_dict(),
        "documents": {"train": len(train_docs), "eval": len(eval_docs)},
        "blocks": {"train": train_blocks.n, "eval": 0 if eval_blocks is None else eval_blocks.n},
        "tokenizer_source": tokenizer_source,
    }


# -- worker ------------------------------------------------------------------------------------


def train_loop(loop_config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import torch

    cfg = load_job_config(loop_config["config"])
    assert isinstance(cfg, TrainingJobConfig)
    prep = loop_config["prepared"]
    spec = cfg.spec
    rt = RuntimeInfo.current()
    torch.manual_seed(spec.training.seed)

    # ---- setup: data ----
    train_blocks: D.TokenBlocks = ray.get(prep["train"])
    eval_blocks: D.TokenBlocks | None = ray.get(prep["eval"]) if prep["eval"] is not None else None
    masked = spec.objective == "masked"
    tokenizer = D.tokenizer_from_files(prep["tokenizer_files"]) if masked else None
    seq = spec.data.sequence_length

    # ---- setup: model ----
    bf16, dtype_name = resolve_precision(spec.training.precision, rt.on_gpu)
    if cfg.paths.base_model:
        model = models.load_pretrained(cfg.paths.base_model, cfg.paths.work_dir, masked=masked)
    else:
        conf = models.fresh_config(spec.model, prep["vocab_size"], seq, prep["special"])
        model = models.build_fresh(conf, masked)
    if spec.deepspeed and spec.deepspeed.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_params = sum(p.numel() for p in model.parameters())
    layers, hidden = models.shape(model)
    flops_per_token = progress.model_flops_per_token(models.active_params(model), layers, hidden, seq)

    # ---- setup: optimizer, schedule, parallelism ----
    plan = optim.batch_plan(_global_batch(spec), spec.training.micro_batch_size, rt.world)
    total_steps = _total_steps(spec, plan)
    ckpt = Checkpointer(rt, spec.checkpointing.interval_steps)
    if spec.deepspeed is not None:
        import deepspeed

        ds_cfg = optim.deepspeed_config(spec.deepspeed, spec.training, plan, bf16, rt.on_gpu)
        client_opt = None if "optimizer" in ds_cfg else optim.adamw(model, spec.training)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model,
            optimizer=client_opt,
            config=ds_cfg,
            model_parameters=optim.param_groups(model, spec.training.weight_decay)
            if client_opt is None
            else None,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, optim.lr_lambda(spec.training, total_steps)
            ),
        )
        net, device = engine, engine.device
    else:
        import ray.train.torch

        model = ray.train.torch.prepare_model(model)
        optimizer = optim.adamw(model, spec.training)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, optim.lr_lambda(spec.training, total_steps))
        engine, net, device = None, model, ray.train.torch.get_device()

    peak, peak_how = progress.device_peak_flops()
    reporter = progress.Reporter(
        job=cfg.name,
        namespace=cfg.namespace,
        kind="TrainingJob",
        total_steps=total_steps,
        tokens_per_step=plan.global_batch * seq,
        flops_per_token=flops_per_token,
        peak_flops_total=peak * rt.world,
        interval=cfg.run.progress_interval_seconds,
        is_chief=rt.rank == 0,
    )
    start_step = ckpt.restore(
        engine=engine,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        reporter=reporter,
        resume_from=spec.checkpointing.resume_from,
        work_dir=cfg.paths.work_dir,
    )
    reporter.event(
        "training started",
        start_step=start_step,
        total_steps=total_steps,
        parameters=n_params,
        world_size=rt.world,
        accumulation=plan.accumulation,
        precision=dtype_name,
        peak_flops_per_worker=peak,
        peak_source=peak_how,
        deepspeed_stage=None if spec.deepspeed is None else spec.deepspeed.zero_stage,
    )

    def batch_for(step: int, micro_index: int) -> dict[str, torch.Tensor]:
        idx = D.worker_slice(
            D.batch_indices(train_blocks.n, plan.global_batch, step, spec.training.seed), rt.rank, rt.world
        )
        mine = idx[micro_index * plan.micro : (micro_index + 1) * plan.micro]
        return _make_batch(
            train_blocks,
            mine,
            masked,
            tokenizer,
            spec.mask_probability,
            seed=spec.training.seed * 1_000_003 + step * 997 + rt.rank * 31 + micro_index,
            device=device,
        )

    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16 and engine is None)

    # ---- train ----
    first_loss = None
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        total_loss = torch.zeros((), device=device)
        for micro in range(plan.accumulation):
            batch = batch_for(step, micro)
            with autocast:
                loss = net(**batch).loss
            if engine is not None:
                engine.backward(loss)
                engine.step()  # DeepSpeed accumulates and steps at the boundary
            else:
                (loss / plan.accumulation).backward()
            total_loss += loss.detach() / plan.accumulation
        if engine is None:
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec.training.grad_clip)
                if spec.training.grad_clip > 0
                else _grad_norm(model)
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            grad_norm = engine.get_global_grad_norm()
        loss_value = collective.mean(total_loss)
        first_loss = first_loss if first_loss is not None else loss_value
        done = step + 1
        reporter.step(
            done,
            loss_value,
            scheduler.get_last_lr()[0],
            grad_norm=collective.as_float(grad_norm),
            samples=plan.global_batch,
            step_seconds=round(time.perf_counter() - t0, 4),
        )
        evaluating = (
            eval_blocks is not None
            and spec.evaluation.interval_steps
            and done % spec.evaluation.interval_steps == 0
            and done != total_steps
        )
        if evaluating:
            reporter.evaluation(done, _evaluate(net, eval_blocks, spec, plan, rt, masked, tokenizer, device))
        ckpt.maybe_save(
            done,
            total_steps,
            engine=engine,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            reporter=reporter,
            metrics={"loss": loss_value},
        )
        fault_injection(cfg, done)

    # ---- cleanup ----
    final_eval = (
        _evaluate(net, eval_blocks, spec, plan, rt, masked, tokenizer, device)
        if eval_blocks is not None
        else {}
    )
    if final_eval:
        reporter.evaluation(total_steps, final_eval)
    state_dict = _full_state_dict(engine, model)
    if rt.rank == 0:
        last = reporter.last
        summary = {
            "job": cfg.name,
            "kind": "TrainingJob",
            "objective": spec.objective,
            "architecture": getattr(model, "module", model).config.model_type,
            "parameters": n_params,
            "steps": total_steps,
            "resumed_from_step": start_step,
            "first_loss": reporter.history[0]["loss"] if reporter.history else first_loss,
            "final_loss": reporter.history[-1]["loss"] if reporter.history else None,
            "final_eval": final_eval,
            "tokens_seen": reporter.tokens_seen,
            "tokens_per_second": last.get("tokens_per_second"),
            "mfu": last.get("mfu"),
            "mfu_peak_source": peak_how,
            "wall_seconds": last.get("elapsed_seconds"),
            "filters": prep["filters"],
            "documents": prep["documents"],
            "blocks": prep["blocks"],
            "tokenizer": prep["tokenizer_source"],
            "world_size": rt.world,
            "deepspeed_zero_stage": None if spec.deepspeed is None else spec.deepspeed.zero_stage,
            "precision": dtype_name,
        }
        _write_output(cfg, model, state_dict, prep["tokenizer_files"], summary, reporter)
        progress.emit(
            {
                "type": "done",
                "output": cfg.paths.output,
                "final_loss": summary["final_loss"],
                "step": total_steps,
                "total_steps": total_steps,
            }
        )
    ckpt.barrier()


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


def _evaluate(
    net: Any,
    blocks: D.TokenBlocks | None,
    spec: Any,
    plan: optim.BatchPlan,
    rt: RuntimeInfo,
    masked: bool,
    tokenizer: Any,
    device: Any,
) -> dict[str, float]:
    """Token-weighted loss over this worker's slice of the eval blocks, summed across workers."""
    import math

    import numpy as np
    import torch

    if blocks is None:
        return {}
    net.eval()
    mine = np.arange(blocks.n)[rt.rank :: rt.world]
    batches = [mine[i : i + plan.micro] for i in range(0, len(mine), plan.micro)][
        : spec.evaluation.max_batches
    ]
    # Every worker must run the same number of forwards (ZeRO-3 gathers parameters collectively).
    n_batches = int(collective.maximum(len(batches)))
    loss_sum = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    with torch.no_grad():
        for i in range(n_batches):
            idx = (
                batches[i]
                if i < len(batches)
                else batches[0]
                if batches
                else np.arange(min(plan.micro, blocks.n))
            )
            real = i < len(batches) and len(batches) > 0
            batch = _make_batch(
                blocks, idx, masked, tokenizer, spec.mask_probability, seed=12345 + i, device=device
            )
            out = net(**batch)
            n = (batch["labels"] != -100).sum()
            if real:
                loss_sum += out.loss.detach().float() * n
                count += n
    net.train()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(loss_sum)
        torch.distributed.all_reduce(count)
    loss = (loss_sum / count.clamp(min=1)).item()
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": float(count.item())}


def _grad_norm(model: Any) -> Any:
    import torch

    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def _full_state_dict(engine: Any, model: Any) -> dict[str, Any] | None:
    """The whole model's weights on rank 0 (ZeRO-3 gathers its shards: every rank must call)."""
    if engine is not None and engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    return None


def _write_output(
    cfg: TrainingJobConfig,
    model: Any,
    state_dict: dict[str, Any] | None,
    tokenizer_files: dict[str, bytes],
    summary: dict[str, Any],
    reporter: progress.Reporter,
) -> None:
    target = storage.resolve(cfg.paths.output, cfg.paths.work_dir)
    with tempfile.TemporaryDirectory(prefix="forgeline-out-") as tmp:
        out = Path(tmp)
        bare = getattr(model, "module", model)
        bare.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        for name, blob in tokenizer_files.items():
            (out / name).write_bytes(blob)
        outputs.write_metrics(out, summary)
        outputs.plot_loss(
            out, reporter.history, reporter.eval_history, f"{cfg.name} ({summary['architecture']})"
        )
        (out / "job_config.json").write_text(json.dumps(json.loads(dump_job_config(cfg)), indent=2))
        storage.publish_dir(out, target)
