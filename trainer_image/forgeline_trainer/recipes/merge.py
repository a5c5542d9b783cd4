"""Adapter mixing: several trained LoRA adapters on the same base become one (PEFT's own
`add_weighted_adapter`: linear, cat, svd, TIES, DARE, magnitude pruning). Trains nothing.

Launch (what the operator and `forgeline run` do):
    # a FineTuneJob with method merge and spec.merge
    python -m forgeline_trainer --config job.json

Reads top to bottom:
    prepare()     driver: the base model and every adapter resolve; each adapter is a LoRA adapter
                  of spec.baseModel with the same target modules and task (a mismatch fails here,
                  in seconds, naming the field); the held-out records of each spec.dataset source
                  (one source = one task) are tokenized as the fine-tune recipe does
    train_loop()  one Ray Train worker (a merge is one process; on a GPU cluster it runs where the
                  GPU is), in named phases:
        _load_base       the base model (fp32 on CPU, the training precision on a GPU)
        _load_adapters   every input adapter into one PeftModel, under its name
        _merge           add_weighted_adapter → the adapter `merged` (the combination's own rules:
                         equal ranks for linear/ties/dare, density for pruning)
        _evaluate        per task: the base, each adapter alone and the mix (response-token loss
                         and accuracy, evaluation.response_metrics); eval records: base at step 0,
                         mix at step 1 (the Eval column's before → after)
        _finish          publish the mixed adapter (PEFT directory, loadable with
                         PeftModel.from_pretrained on the base), tokenizer, metrics.json with the
                         evaluation table, probe.safetensors; mergeIntoBase also `merged/`: the
                         full model with the mix folded in (merge_and_unload)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgeline_operator.api.finetune_job import (
    DENSITY_COMBINATIONS,
    SAME_RANK_COMBINATIONS,
    SIGN_COMBINATIONS,
)
from forgeline_operator.api.jobconfig import FineTuneJobConfig

from .. import data as D
from .. import evaluation, models, outputs, progress, sft_data
from ..errors import ConfigError, DataError, ModelUnavailable
from ..runtime import Worker, train_device

Job = Worker[FineTuneJobConfig]
MERGED = "merged"
"""The mixed adapter's name inside the PeftModel (and the subdirectory of the full model)."""
DEFAULT_DENSITY = 0.5
"""Fraction of values kept by TIES/DARE/magnitude pruning when spec.merge.density is unset."""
_PROBE_TEXT = "Below is an instruction that describes a task."

# -- driver ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeData:
    """What `prepare` hands the worker."""

    base_dir: str
    adapter_dirs: list[str]
    labels: list[str]
    ranks: list[int]
    tokenizer_files: dict[str, bytes]
    pad_id: int
    probe_ids: list[int]
    tasks: dict[str, Any] = field(default_factory=dict)
    """Held-out examples per spec.dataset source (task name → Ray object ref of list[Tokenized])."""
    examples: dict[str, int] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        return {"adapters": len(self.adapter_dirs), "examples": self.examples}


def prepare(cfg: FineTuneJobConfig, staging: Path) -> MergeData:
    import ray
    from transformers import AutoConfig

    spec, work, paths = cfg.spec, cfg.paths.work_dir, cfg.paths
    if spec.merge is None:
        raise ConfigError("spec.merge: method merge needs the adapters to mix")
    if not paths.base_model:
        raise ModelUnavailable("spec.baseModel: no base model resolved")
    if len(paths.adapters) != len(spec.merge.adapters):
        raise ConfigError(
            f"spec.merge.adapters: {len(spec.merge.adapters)} adapters, "
            f"{len(paths.adapters)} locations resolved"
        )
    base_dir = models.model_location(paths.base_model, work)
    AutoConfig.from_pretrained(base_dir)  # fails here, not in the worker, if it is no model
    adapter_dirs = [models.model_location(a, work) for a in paths.adapters]
    ranks = _check_adapters(cfg, base_dir, adapter_dirs)
    tokenizer = D.load_tokenizer(base_dir)
    tok_dir = staging / "tokenizer"
    tokenizer.save_pretrained(str(tok_dir))
    tasks, examples, probe_text = {}, {}, _PROBE_TEXT
    if spec.dataset is not None:
        ds = spec.dataset
        if ds.chat_template:
            tokenizer.chat_template = ds.chat_template
        for name, src in zip(task_names(ds.sources), ds.sources, strict=True):
            records = sft_data.read_examples([src], ds.format, work)
            toks = [
                sft_data.tokenize_example(r, ds.format, tokenizer, ds.max_sequence_length, ds.loss_on_prompt)
                for r in records
            ]
            toks = [t for t in toks if t.response_tokens]
            if not toks:
                raise DataError(
                    f"spec.dataset.sources ({src.uri}): no example has response tokens left after "
                    "truncation; raise spec.dataset.maxSequenceLength"
                )
            if probe_text == _PROBE_TEXT:
                probe_text = sft_data.prompt_of(records[0], ds.format, tokenizer)
            tasks[name], examples[name] = ray.put(toks), len(toks)
    return MergeData(
        base_dir=base_dir,
        adapter_dirs=adapter_dirs,
        labels=spec.merge.labels(),
        ranks=ranks,
        tokenizer_files=D.tokenizer_files(tok_dir),
        pad_id=tokenizer.pad_token_id,
        probe_ids=tokenizer(probe_text, add_special_tokens=False)["input_ids"][-64:],
        tasks=tasks,
        examples=examples,
    )


def task_names(sources: list[Any]) -> list[str]:
    """One name per spec.dataset source: its file name without extension (made unique)."""
    names: list[str] = []
    for src in sources:
        stem = Path(src.uri.rstrip("/").split("://")[-1]).name.split(".")[0] or "source"
        name, n = stem, 2
        while name in names:
            name, n = f"{stem}-{n}", n + 1
        names.append(name)
    return names


def _check_adapters(cfg: FineTuneJobConfig, base_dir: str, adapter_dirs: list[str]) -> list[int]:
    """Every adapter is a LoRA adapter of this base, with the first one's target modules and task
    type; the ranks fit the combination. Each error names the field and says what to do. Returns
    the adapters' ranks."""
    from peft import PeftConfig

    merge = cfg.spec.merge
    assert merge is not None
    configs = []
    for i, where in enumerate(adapter_dirs):
        field_name = f"spec.merge.adapters[{i}]"
        try:
            pc = PeftConfig.from_pretrained(where)
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(
                f"{field_name}: no PEFT adapter at {where} (adapter_config.json): {exc} — fix: point it "
                "at a LoRA FineTuneJob's output (fromJob) or a PEFT adapter directory"
            ) from exc
        if pc.peft_type != "LORA":
            raise ConfigError(
                f"{field_name}: {where} is a {pc.peft_type} adapter; only LoRA adapters can be mixed — "
                "fix: use the outputs of method lora or qlora jobs"
            )
        if not same_base(pc.base_model_name_or_path, base_dir):
            raise ConfigError(
                f"{field_name}: the adapter at {where} was trained on {pc.base_model_name_or_path}, not on "
                f"spec.baseModel ({base_dir}) — fix: set spec.baseModel to the model the adapters were "
                "trained on, or mix only adapters trained on the same base"
            )
        configs.append(pc)
    first = configs[0]
    for i, pc in enumerate(configs[1:], 1):
        if _targets(pc) != _targets(first):
            raise ConfigError(
                f"spec.merge.adapters[{i}]: adapts modules {sorted(_targets(pc))}, adapters[0] adapts "
                f"{sorted(_targets(first))} — fix: mix adapters trained with the same lora.targetModules"
            )
        if pc.task_type != first.task_type:
            raise ConfigError(
                f"spec.merge.adapters[{i}]: task type {pc.task_type}, adapters[0] has {first.task_type} — "
                "fix: mix adapters of one kind (all causal-LM fine-tunes)"
            )
    ranks = [max([pc.r, *(pc.rank_pattern or {}).values()]) for pc in configs]
    if merge.combination in SAME_RANK_COMBINATIONS and len(set(ranks)) > 1:
        raise ConfigError(
            f"spec.merge.combination: {merge.combination} adds the adapters' A and B factors, which needs "
            f"equal ranks (the adapters have r = {ranks}) — fix: use combination cat or svd, or retrain "
            "with one lora.r"
        )
    return ranks


def _targets(pc: Any) -> frozenset[str]:
    targets = pc.target_modules
    return frozenset([targets] if isinstance(targets, str) else targets or ())


def same_base(recorded: str | None, base_dir: str) -> bool:
    """Whether an adapter's recorded base (PEFT's base_model_name_or_path) is this base: the same
    hub id or directory, or a directory with byte-identical config and weights (a copy)."""
    if not recorded:
        return False
    if _identity(recorded) == _identity(base_dir):
        return True
    a, b = Path(recorded), Path(base_dir)
    if not (a.is_dir() and b.is_dir()):
        return False
    return _fingerprint(a) == _fingerprint(b)


def _identity(location: str) -> str:
    return os.path.realpath(location) if Path(location).exists() else location.rstrip("/")


def _fingerprint(model_dir: Path) -> str | None:
    """SHA-256 over a model directory's config.json and weight files (None: no weights)."""
    files = sorted(
        p for p in model_dir.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin")
    )
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        return None
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        with p.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


# -- worker ------------------------------------------------------------------------------------


def train_loop(loop_config: dict[str, Any]) -> None:
    job = Worker.start(loop_config, FineTuneJobConfig)
    prep: MergeData = loop_config["prepared"]
    reporter = progress.Reporter.for_run(
        job.cfg, job.rt, total_steps=1, tokens_per_step=0, flops_per_token=0.0, extra={"method": "merge"}
    )
    base = _load_base(job, prep)
    model = _load_adapters(job, prep, base, reporter)
    _merge(job, prep, model, reporter)
    with reporter.timed("evaluation"):
        table, final_eval = _evaluate(job, prep, model, reporter)
    _finish(job, prep, model, reporter, table, final_eval)


def _load_base(job: Job, prep: MergeData) -> Any:
    """The base model on this worker's device: fp32 on CPU, the training precision on a GPU."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if job.bf16 else torch.float32
    return AutoModelForCausalLM.from_pretrained(prep.base_dir, dtype=dtype).to(train_device())


def _load_adapters(job: Job, prep: MergeData, base: Any, reporter: progress.Reporter) -> Any:
    """One PeftModel holding every input adapter under its name."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, prep.adapter_dirs[0], adapter_name=prep.labels[0])
    for where, label in zip(prep.adapter_dirs[1:], prep.labels[1:], strict=True):
        model.load_adapter(where, adapter_name=label)
    reporter.event(
        "adapters loaded",
        adapters=prep.labels,
        ranks=prep.ranks,
        parameters=sum(p.numel() for p in model.parameters()),
        precision=job.precision,
    )
    return model


def _merge(job: Job, prep: MergeData, model: Any, reporter: progress.Reporter) -> None:
    """add_weighted_adapter → the adapter `merged`, made the active one."""
    merge = job.cfg.spec.merge
    assert merge is not None
    combo = merge.combination
    kwargs: dict[str, Any] = {}
    if combo in DENSITY_COMBINATIONS:
        kwargs["density"] = merge.density if merge.density is not None else DEFAULT_DENSITY
    if combo in SIGN_COMBINATIONS:
        kwargs["majority_sign_method"] = merge.majority_sign_method or "total"
    if combo.endswith("svd") and merge.svd_rank is not None:
        kwargs["svd_rank"] = merge.svd_rank
    weights = [a.weight for a in merge.adapters]
    try:
        model.add_weighted_adapter(prep.labels, weights, MERGED, combination_type=combo, **kwargs)
    except ValueError as exc:  # PEFT's own checks (ranks, target module types)
        raise ConfigError(
            f"spec.merge.combination: PEFT cannot mix these adapters with {combo}: {exc}"
        ) from exc
    model.set_adapter(MERGED)
    rank = model.peft_config[MERGED].r
    reporter.event("adapters merged", combination=combo, weights=weights, rank=rank, **kwargs)


def _evaluate(
    job: Job, prep: MergeData, model: Any, reporter: progress.Reporter
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Per task (spec.dataset source): the base, each adapter alone, the mix. The base over every
    task is the step-0 eval record, the mix the step-1 one. Returns (table, the mix's metrics)."""
    import ray

    if not prep.tasks:
        model.set_adapter(MERGED)
        return {}, {}
    ev, micro = job.cfg.spec.evaluation, job.cfg.spec.training.micro_batch_size
    device = train_device()
    tasks = {name: ray.get(ref) for name, ref in prep.tasks.items()}

    def measure(examples: list[sft_data.Tokenized]) -> dict[str, Any]:
        return evaluation.response_metrics(model, examples, prep.pad_id, device, micro, ev.max_batches)

    table: dict[str, dict[str, Any]] = {name: {} for name in tasks}
    with model.disable_adapter():
        for name, examples in tasks.items():
            table[name]["base"] = measure(examples)
    for label in prep.labels:
        model.set_adapter(label)
        for name, examples in tasks.items():
            table[name][f"adapter:{label}"] = measure(examples)
    model.set_adapter(MERGED)
    for name, examples in tasks.items():
        table[name]["merge"] = measure(examples)
    model.eval()
    baseline = pooled([row["base"] for row in table.values()])
    final = pooled([row["merge"] for row in table.values()])
    reporter.evaluation(0, baseline)
    reporter.evaluation(1, final)
    reporter.event(
        "evaluated",
        **{
            f"{name}_eval_loss": {k: round(v["eval_loss"], 4) for k, v in row.items()}
            for name, row in table.items()
        },
    )
    return table, final


def pooled(parts: list[dict[str, Any]]) -> dict[str, float]:
    """One set of eval metrics from per-task ones, weighted by tokens (the loss interval from the
    pooled per-token variance, recovered from each part's interval)."""
    n = sum(p["eval_tokens"] for p in parts)
    if n <= 0:
        return {}
    loss = sum(p["eval_loss"] * p["eval_tokens"] for p in parts) / n
    accuracy = sum(p["accuracy"] * p["eval_tokens"] for p in parts) / n
    # each part: ci = 1.96·sqrt(var/n) → var = (ci/1.96)²·n; pooled E[x²] = Σ n_i (var_i + mean_i²) / N
    second = 0.0
    for p in parts:
        ci = p.get("eval_loss_ci95") or 0.0
        var = (ci / 1.96) ** 2 * p["eval_tokens"]
        second += p["eval_tokens"] * (var + p["eval_loss"] ** 2)
    return {
        "eval_loss": loss,
        "eval_loss_ci95": evaluation.mean_ci95(loss, second / n, n),
        "perplexity": math.exp(min(loss, 50.0)),
        "accuracy": accuracy,
        "accuracy_ci95": evaluation.proportion_ci95(accuracy, n),
        "eval_tokens": float(n),
    }


def _finish(
    job: Job,
    prep: MergeData,
    model: Any,
    reporter: progress.Reporter,
    table: dict[str, dict[str, Any]],
    final_eval: dict[str, float],
) -> None:
    """Publish the mixed adapter (+ the full merged model with mergeIntoBase) and metrics.json."""
    cfg = job.cfg
    merge = cfg.spec.merge
    assert merge is not None
    parameters = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    adapter_params = sum(p.numel() for n, p in model.named_parameters() if f".{MERGED}." in n)
    stats = models.ModelStats(parameters, adapter_params, 0.0)
    summary = outputs.summary(
        job,
        reporter,
        stats,
        final_eval,
        **outputs.finetune_fields(
            cfg, stats, prep.examples, "adapter+merged" if merge.merge_into_base else "adapter"
        ),
        adapters=[
            {"name": label, "location": where, "weight": a.weight, "rank": r}
            for label, where, a, r in zip(
                prep.labels, prep.adapter_dirs, merge.adapters, prep.ranks, strict=True
            )
        ],
        combination=merge.combination,
        merged_rank=model.peft_config[MERGED].r,
        evaluation=table,
        merged_model="merged" if merge.merge_into_base else None,
    )

    def save_model(out: Path) -> None:
        _save_adapter(model, out)
        _save_probe(model, prep.probe_ids, out)
        if merge.merge_into_base:
            full = out / MERGED
            model.merge_and_unload(adapter_names=[MERGED]).save_pretrained(full, safe_serialization=True)
            for name, blob in prep.tokenizer_files.items():
                (full / name).write_bytes(blob)

    title = f"{cfg.name} (merge: {merge.combination})"
    outputs.publish(cfg, save_model, prep.tokenizer_files, summary, reporter, title)


def _save_adapter(model: Any, out: Path) -> None:
    """The mixed adapter as a plain PEFT adapter directory (adapter_config.json +
    adapter_model.safetensors at the top, as a LoRA FineTuneJob writes it)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        # save_pretrained writes a non-default adapter into a subdirectory named after it
        model.save_pretrained(tmp, selected_adapters=[MERGED], safe_serialization=True)
        src = Path(tmp) / MERGED
        for p in src.iterdir():
            p.replace(out / p.name)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["inference_mode"] = True
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _save_probe(model: Any, probe_ids: list[int], out: Path) -> None:
    """probe.safetensors: the mix's logits on a fixed prompt (a reload must match)."""
    import torch
    from safetensors.torch import save_file

    model.eval()
    probe = torch.tensor([probe_ids], device=train_device())
    with torch.no_grad():
        logits = model(input_ids=probe).logits.float().cpu()
    save_file({"input_ids": probe.cpu(), "logits": logits.contiguous()}, str(out / "probe.safetensors"))
