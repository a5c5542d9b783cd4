"""Supervised fine-tuning: full, LoRA, QLoRA (4-bit NF4 base + LoRA) and prompt tuning (PEFT).

Launch (what the operator and `forgeline run` do):
    # a FineTuneJob with method full|lora|qlora|prompt-tuning
    python -m forgeline_trainer --config job.json

Reads top to bottom:
    prepare()     driver: check the base model, load its tokenizer, read and check the records
                  (alpaca or chat), split off the eval set, tokenize with labels on responses only
    train_loop()  each Ray Train worker:
        setup     base model (4-bit for qlora), PEFT wrapper, optimizer over trainable weights only,
                  DDP or DeepSpeed, resume from the newest checkpoint (trainable weights + optimizer)
        train     deterministic batches by step; response-token loss; evals and checkpoints
        cleanup   rank 0 saves the adapter (or merged / full weights), tokenizer, metrics.json,
                  loss.png and probe.safetensors (logits of the trained model on a fixed input, to
                  check a reload reproduces it)
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from forgeline_operator.api.finetune_job import LoraSettings, PromptTuningSettings
from forgeline_operator.api.jobconfig import FineTuneJobConfig, dump_job_config, load_job_config

from .. import collective, models, optim, outputs, progress, sft_data, storage
from .. import data as D
from ..checkpoints import Checkpointer
from ..runtime import RuntimeInfo, fault_injection, resolve_precision

# -- driver ------------------------------------------------------------------------------------


def prepare(cfg: FineTuneJobConfig, staging: Path) -> dict[str, Any]:
    import ray
    from transformers import AutoConfig

    spec, work = cfg.spec, cfg.paths.work_dir
    if not cfg.paths.base_model:
        raise ValueError("spec.baseModel: no base model resolved")
    base_dir = models.model_location(cfg.paths.base_model, work)
    AutoConfig.from_pretrained(base_dir)  # fails here, not in every worker, if it is no model
    tokenizer = D.load_tokenizer(base_dir)
    tok_dir = staging / "tokenizer"
    tokenizer.save_pretrained(str(tok_dir))
    ds = spec.dataset
    if ds.chat_template:
        tokenizer.chat_template = ds.chat_template
    records = sft_data.read_examples(ds.sources, ds.format, work)
    if spec.evaluation.sources:
        train, held = records, sft_data.read_examples(spec.evaluation.sources, ds.format, work)
    else:
        train, held = sft_data.holdout(records, spec.evaluation.holdout_fraction)

    def tok(rs: list[dict[str, Any]]) -> list[sft_data.Tokenized]:
        out = [
            sft_data.tokenize_example(r, ds.format, tokenizer, ds.max_sequence_length, ds.loss_on_prompt)
            for r in rs
        ]
        return [t for t in out if any(label != sft_data.IGNORE for label in t.labels)]

    train_tok, eval_tok = tok(train), tok(held)
    if not train_tok:
        raise ValueError(
            "spec.dataset: no example has response tokens left after truncation; "
            "raise spec.dataset.maxSequenceLength"
        )
    probe_text = sft_data.prompt_of(train[0], ds.format, tokenizer)
    return {
        "train": ray.put(train_tok),
        "eval": ray.put(eval_tok) if eval_tok else None,
        "base_dir": base_dir,
        "tokenizer_files": {p.name: p.read_bytes() for p in tok_dir.iterdir() if p.is_file()},
        "pad_id": tokenizer.pad_token_id,
        "probe_ids": tokenizer(probe_text, add_special_tokens=False)["input_ids"][-64:],
        "examples": {
            "train": len(train_tok),
            "eval": len(eval_tok),
            "dropped": len(train) + len(held) - len(train_tok) - len(eval_tok),
        },
    }


# -- worker ------------------------------------------------------------------------------------


def train_loop(loop_config: dict[str, Any]) -> None:
    import ray
    import torch

    cfg = load_job_config(loop_config["config"])
    assert isinstance(cfg, FineTuneJobConfig)
    prep = loop_config["prepared"]
    spec, method = cfg.spec, cfg.spec.method
    rt = RuntimeInfo.current()
    torch.manual_seed(spec.training.seed)
    train_ex: list[sft_data.Tokenized] = ray.get(prep["train"])
    eval_ex: list[sft_data.Tokenized] = ray.get(prep["eval"]) if prep["eval"] is not None else []

    # ---- setup: model ----
    bf16, dtype_name = resolve_precision(spec.training.precision, rt.on_gpu)
    device = torch.device(f"cuda:{rt.local_rank}") if rt.on_gpu else torch.device("cpu")
    model = _load_model(spec, prep["base_dir"], device)
    if spec.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = _wrap_peft(spec, model, prep["base_dir"])
    n_total = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_4bit = _count_4bit(model)
    layers, hidden = models.shape(getattr(model, "base_model", model))
    # Forward 2N + backward through activations 2N + weight gradients only for what trains.
    base_params = models.active_params(model)
    flops_per_token = (
        4.0 * base_params + 2.0 * n_trainable + 12.0 * layers * hidden * spec.dataset.max_sequence_length
    )

    plan = optim.batch_plan(spec.training.global_batch_size, spec.training.micro_batch_size, rt.world)
    total_steps = spec.training.max_steps or max(
        1, math.ceil(spec.training.epochs * len(train_ex) / plan.global_batch)
    )
    ckpt = Checkpointer(rt, spec.checkpointing.interval_steps, trainable_only=method != "full")
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
        net = engine
    else:
        import ray.train.torch

        engine = None
        if rt.world > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[rt.local_rank] if rt.on_gpu else None, find_unused_parameters=False
            )
        optimizer = optim.adamw(model, spec.training)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, optim.lr_lambda(spec.training, total_steps))
        net = model
    peak, peak_how = progress.device_peak_flops()
    avg_tokens = sum(len(e.input_ids) for e in train_ex) / len(train_ex)
    reporter = progress.Reporter(
        job=cfg.name,
        namespace=cfg.namespace,
        kind="FineTuneJob",
        total_steps=total_steps,
        tokens_per_step=int(avg_tokens * plan.global_batch),
        flops_per_token=flops_per_token,
        peak_flops_total=peak * rt.world,
        interval=cfg.run.progress_interval_seconds,
        is_chief=rt.rank == 0,
        extra={"trainable_fraction": round(n_trainable / n_total, 6), "method": method},
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
        method=method,
        parameters=n_total,
        trainable_parameters=n_trainable,
        quantized_4bit_layers=n_4bit,
        world_size=rt.world,
        accumulation=plan.accumulation,
        precision=dtype_name,
        peak_source=peak_how,
    )
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16 and engine is None)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def micro_batch(step: int, micro: int) -> tuple[dict[str, Any], int]:
        idx = D.worker_slice(
            D.batch_indices(len(train_ex), plan.global_batch, step, spec.training.seed), rt.rank, rt.world
        )[micro * plan.micro : (micro + 1) * plan.micro]
        batch = sft_data.collate([train_ex[i] for i in idx], prep["pad_id"], device)
        return batch, int(batch["attention_mask"].sum())

    # ---- train ----
    first_loss = None
    for step in range(start_step, total_steps):
        total_loss = torch.zeros((), device=device)
        tokens = torch.zeros((), device=device)
        for micro in range(plan.accumulation):
            batch, n_tok = micro_batch(step, micro)
            tokens += n_tok
            with autocast:
                loss = net(**batch).loss
            if engine is not None:
                engine.backward(loss)
                engine.step()
            else:
                (loss / plan.accumulation).backward()
            total_loss += loss.detach() / plan.accumulation
        if engine is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, spec.training.grad_clip or float("inf"))
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
            tokens=int(collective.total(tokens)),
            epoch=round(done * plan.global_batch / len(train_ex), 4),
        )
        if (
            eval_ex
            and spec.evaluation.interval_steps
            and done % spec.evaluation.interval_steps == 0
            and done != total_steps
        ):
            reporter.evaluation(done, _evaluate(net, eval_ex, spec, plan, rt, prep["pad_id"], device))
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
    final_eval = _evaluate(net, eval_ex, spec, plan, rt, prep["pad_id"], device) if eval_ex else {}
    if final_eval:
        reporter.evaluation(total_steps, final_eval)
    if rt.rank == 0:
        bare = getattr(model, "module", model)
        last = reporter.last
        summary = {
            "job": cfg.name,
            "kind": "FineTuneJob",
            "method": method,
            "base_model": cfg.paths.base_model,
            "parameters": n_total,
            "trainable_parameters": n_trainable,
            "trainable_fraction": n_trainable / n_total,
            "quantized_4bit_layers": n_4bit,
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
            "examples": prep["examples"],
            "world_size": rt.world,
            "precision": dtype_name,
            "saved": _save_mode(spec),
        }
        _write_output(cfg, bare, prep, summary, reporter, device)
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


def _load_model(spec: Any, base_dir: str, device: Any):  # noqa: ANN202
    import torch
    from transformers import AutoModelForCausalLM

    if spec.method == "qlora":
        from transformers import BitsAndBytesConfig

        q = spec.quantization
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        )
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, quantization_config=bnb, device_map={"": str(device)}
        )
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.training.gradient_checkpointing
        )
    return AutoModelForCausalLM.from_pretrained(base_dir).to(device)


def _wrap_peft(spec: Any, model: Any, base_dir: str):  # noqa: ANN202
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, get_peft_model

    if spec.method in ("lora", "qlora"):
        lora = spec.lora or LoraSettings()
        targets = "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules
        return get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=targets,
                bias=lora.bias,
                task_type="CAUSAL_LM",
            ),
        )
    if spec.method == "prompt-tuning":
        pt = spec.prompt_tuning or PromptTuningSettings()
        init = PromptTuningInit.TEXT if pt.init_text else PromptTuningInit.RANDOM
        return get_peft_model(
            model,
            PromptTuningConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=pt.num_virtual_tokens,
                prompt_tuning_init=init,
                prompt_tuning_init_text=pt.init_text,
                tokenizer_name_or_path=base_dir if pt.init_text else None,
            ),
        )
    return model


def _count_4bit(model: Any) -> int:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def _save_mode(spec: Any) -> str:
    if spec.method == "full":
        return "full"
    return spec.output.save or "adapter"


def _evaluate(
    net: Any,
    examples: list[sft_data.Tokenized],
    spec: Any,
    plan: optim.BatchPlan,
    rt: RuntimeInfo,
    pad_id: int,
    device: Any,
) -> dict[str, float]:
    """Response-token loss and next-token accuracy, over every worker's slice."""
    import torch

    mine = list(range(rt.rank, len(examples), rt.world))
    batches = [mine[i : i + plan.micro] for i in range(0, len(mine), plan.micro)][
        : spec.evaluation.max_batches
    ]
    # DDP's forward broadcasts buffers and ZeRO-3 gathers parameters: every rank must run the same
    # number of forwards, so ranks with fewer batches run (and ignore) extra ones.
    n_batches = int(collective.maximum(len(batches)))
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    net.eval()
    with torch.no_grad():
        for i in range(n_batches):
            real = i < len(batches)
            idx = batches[i] if real else [0]
            batch = sft_data.collate([examples[j] for j in idx], pad_id, device)
            out = net(**batch)
            if not real:
                continue
            logits = out.logits[:, -batch["labels"].shape[1] :, :]  # prompt tuning prepends virtual tokens
            shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
            mask = shift_labels != sft_data.IGNORE
            n = mask.sum()
            loss = torch.nn.functional.cross_entropy(
                shift_logits[mask].float(), shift_labels[mask], reduction="sum"
            )
            loss_sum += loss
            correct += (shift_logits.argmax(-1)[mask] == shift_labels[mask]).sum()
            count += n
    net.train()
    if torch.distributed.is_initialized():
        for t in (loss_sum, correct, count):
            torch.distributed.all_reduce(t)
    c = count.clamp(min=1)
    loss = (loss_sum / c).item()
    return {
        "eval_loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "accuracy": (correct / c).item(),
        "eval_tokens": float(count.item()),
    }


def _write_output(
    cfg: FineTuneJobConfig,
    model: Any,
    prep: dict[str, Any],
    summary: dict[str, Any],
    reporter: progress.Reporter,
    device: Any,
) -> None:
    import torch
    from safetensors.torch import save_file

    target = storage.resolve(cfg.paths.output, cfg.paths.work_dir)
    mode = summary["saved"]
    model.eval()
    probe = torch.tensor([prep["probe_ids"]], device=device)
    with torch.no_grad():
        logits = model(input_ids=probe).logits[:, -probe.shape[1] :, :].float().cpu()
    with tempfile.TemporaryDirectory(prefix="forgeline-out-") as tmp:
        out = Path(tmp)
        if mode == "merged":
            _save_merged(cfg, model, prep["base_dir"], out)
        else:
            model.save_pretrained(out, safe_serialization=True)  # PEFT: adapter only; full: all weights
        for name, blob in prep["tokenizer_files"].items():
            (out / name).write_bytes(blob)
        save_file({"input_ids": probe.cpu(), "logits": logits.contiguous()}, str(out / "probe.safetensors"))
        outputs.write_metrics(out, summary)
        outputs.plot_loss(out, reporter.history, reporter.eval_history, f"{cfg.name} ({cfg.spec.method})")
        (out / "job_config.json").write_text(json.dumps(json.loads(dump_job_config(cfg)), indent=2))
        storage.publish_dir(out, target)


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
