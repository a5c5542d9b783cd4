"""Running TRL's trainers (transformers `Trainer` subclasses) inside Ray Train.

Ray Train sets up torch.distributed; `ray.train.huggingface.transformers.prepare_trainer` adapts
the Trainer to it. Checkpoints follow checkpoints.py's layout and resume rule: `ReportCallback`
reports each Trainer checkpoint to Ray Train as `checkpoint_step_<step>/` (the Trainer's files
under `checkpoint/`, as Ray's own `RayTrainReportCallback` lays them out) with every rank's
completeness marker; `restore` resumes from the newest complete one in storage (Ray Train's
registered checkpoint lags: its controller collects reports every 2 s). `PreemptionCallback` turns
SIGTERM into a checkpoint at the current step and `Preempted` (preemption.py). `ProgressCallback`
turns the Trainer's logs into Forgeline progress records.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from . import checkpoints, collective, preemption, progress
from .optim import HF_OPTIM, BatchPlan

HF_DIR = "checkpoint"
"""The Trainer's checkpoint inside a Ray Train checkpoint directory (RayTrainReportCallback's name)."""


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """This worker's local scratch for one run (the Trainer's output_dir, a downloaded checkpoint
    to resume from), removed when the run ends, also when it fails or is preempted."""
    d = tempfile.mkdtemp(prefix="forgeline-hf-")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def common_args(
    spec: Any, on_gpu: bool, bf16: bool, plan: BatchPlan, total_steps: int, scratch: Path
) -> dict[str, Any]:
    """TrainingArguments fields every TRL recipe shares, from the spec (the Trainer's own
    output_dir is in the run's scratch directory: checkpoints go to Ray Train, the model to
    `outputs`)."""
    t = spec.training
    return dict(
        output_dir=str(scratch / "trainer"),
        max_steps=total_steps,
        gradient_accumulation_steps=plan.accumulation,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        optim=HF_OPTIM[spec.optimizer()],
        max_grad_norm=t.grad_clip if t.grad_clip > 0 else 1e9,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type={
            "cosine": "cosine",
            "linear": "linear",
            "constant": "constant_with_warmup",
            "wsd": "warmup_stable_decay",
        }[t.schedule],
        seed=t.seed,
        data_seed=t.seed,
        bf16=bf16,
        use_cpu=not on_gpu,
        logging_steps=1,
        save_strategy="steps",
        save_steps=spec.checkpointing.interval_steps,
        save_total_limit=spec.checkpointing.keep,
        report_to="none",
        disable_tqdm=True,
        gradient_checkpointing=getattr(t, "gradient_checkpointing", False),
        ddp_backend="nccl" if on_gpu else "gloo",
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def total_steps(spec: Any, n_examples: int, global_batch: int) -> int:
    t = spec.training
    return t.max_steps or max(1, math.ceil(t.epochs * n_examples / global_batch))


def attach(trainer: Any, job: Any, reporter: progress.Reporter, global_batch: int) -> Any:
    """The trainer, reporting progress records and checkpoints to Ray Train and stopping with a
    checkpoint on SIGTERM (resumed by `restore`). The order matters: PreemptionCallback's on_save
    runs after ReportCallback's has reported the checkpoint."""
    from ray.train.huggingface.transformers import prepare_trainer

    trainer.add_callback(ProgressCallback(reporter, global_batch))
    trainer.add_callback(ReportCallback(reporter, job.rt.rank, job.rt.world))
    trainer.add_callback(PreemptionCallback(job.rt.rank))
    return prepare_trainer(trainer)


@dataclass(frozen=True)
class Resume:
    path: str | None
    """The Trainer checkpoint to resume from (`trainer.train(resume_from_checkpoint=...)`); None:
    a fresh start."""
    step: int = 0
    checkpoint: str | None = None
    """Its Ray Train checkpoint directory's name."""


def restore(trainer: Any, job: Any, reporter: progress.Reporter, scratch: Path) -> Resume:
    """`find_resume`, timed as checkpointRestore (the Trainer's own load of the checkpoint, inside
    `train()`, is start-up); the reporter learns the step it resumes from."""
    with reporter.timed("checkpointRestore"):
        resume = find_resume(trainer, job, reporter, scratch)
    reporter.resumed_from = resume.step
    return resume


def find_resume(trainer: Any, job: Any, reporter: progress.Reporter, scratch: Path) -> Resume:
    """Catch SIGTERM from here on (graceful preemption); the newest complete checkpoint of this
    run in storage (checkpoints.py's rule: incomplete ones are skipped with an event), else the one
    Ray Train registered under an older name, else a fresh start. Rank 0 then prunes broken and
    surplus directories, as `Checkpointer.restore` does. (Unlike it, a complete checkpoint that
    fails to load is not fallen back past: the Trainer loads it inside `train()`.)"""
    import ray.train

    why = preemption.install(job.cfg.spec.preemption.grace_period_seconds)
    if why is not None:
        reporter.event("graceful preemption unavailable: SIGTERM stops the worker at once", why=why)
    store = checkpoints.RunStore.current()
    registered = ray.train.get_checkpoint()
    registered_name = None if registered is None else Path(registered.path.rstrip("/")).name
    listing = store.listing()
    markers = {name: store.markers(name, files) for name, files in listing.items()}
    cands = checkpoints.candidates(listing, markers, registered_name)
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, ReportCallback):
            cb.taken = set(listing)  # a step written again gets a new directory
    chosen = newest_complete(cands, reporter)
    checkpoints.prune(store, cands, set(), job.cfg.spec.checkpointing.keep, job.rt.rank)
    if chosen is None:
        return Resume(None)
    if chosen.step is None:  # Ray Train's own naming (RayTrainReportCallback): no markers to check
        local = Path(registered.to_directory(str(scratch / "resume" / chosen.name)))
    else:
        local = store.download(chosen.name, scratch / "resume")
    path = local / HF_DIR
    if not path.exists():
        reporter.event("skipped checkpoint", checkpoint=chosen.name, why=f"it holds no {HF_DIR}/")
        return Resume(None)
    step = _trainer_step(path, chosen.step)
    meta = local / checkpoints.META
    if meta.exists():  # the loss history before this step: metrics.json's first_loss, loss.png
        state = json.loads(meta.read_text())
        reporter.history = state.get("history", [])
        reporter.eval_history = state.get("eval_history", [])
        reporter.tokens_seen = state.get("tokens_seen", 0)
    reporter.event("resumed from checkpoint", step=step, checkpoint=chosen.name)
    return Resume(str(path), step, chosen.name)


def newest_complete(
    cands: list[checkpoints.Candidate], reporter: progress.Reporter
) -> checkpoints.Candidate | None:
    """The first complete candidate (they come newest first); each incomplete one before it is
    named in a `skipped checkpoint` event."""
    for c in cands:
        if c.problem is None:
            return c
        reporter.event("skipped checkpoint", checkpoint=c.name, step=c.step, why=c.problem)
    return None


def _trainer_step(path: Path, default: int | None) -> int:
    try:
        return int(json.loads((path / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return default or 0


class ReportCallback(TrainerCallback):
    """Each Trainer checkpoint → a Ray Train checkpoint named by its step
    (`checkpoint_step_00000040/checkpoint/…`). Every rank reports its own files (rank 0: model,
    optimizer, scheduler, trainer state and `forgeline_state.json`; every rank: its RNG state)
    with its completeness marker; Ray Train merges them into one directory in storage."""

    def __init__(self, reporter: progress.Reporter, rank: int, world: int) -> None:
        self.reporter = reporter
        self.rank = rank
        self.world = world
        self.taken: set[str] = set()
        self.reported: list[int] = []
        self._step_end: tuple[float, float] | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        # the Trainer saves after the step's log and eval: the save's time is from here to the end
        # of on_save, less the time counted in between (an eval)
        self._step_end = (time.perf_counter(), sum(self.reporter.ledger.values()))

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._report(args, state)
        if self._step_end is not None:
            started, counted = self._step_end
            since = sum(self.reporter.ledger.values()) - counted
            self.reporter.spent("checkpointSave", time.perf_counter() - started - since)
            self._step_end = None

    def _report(self, args: Any, state: Any) -> None:
        import ray.train

        step = state.global_step
        metrics: dict[str, Any] = {}
        for log in state.log_history:
            metrics.update(log)
        name = checkpoints.dir_name(step, self.taken)
        self.taken.add(name)
        with tempfile.TemporaryDirectory(prefix="forgeline-ckpt-") as tmp:
            d = Path(tmp)
            source = Path(args.output_dir) / f"checkpoint-{step}"
            if source.is_dir():
                shutil.copytree(source, d / HF_DIR)
            if self.rank == 0:
                meta = {
                    "step": step,
                    "history": self.reporter.history,
                    "eval_history": self.reporter.eval_history,
                    "tokens_seen": self.reporter.tokens_seen,
                }
                (d / checkpoints.META).write_text(json.dumps(meta))
            checkpoints.write_marker(d, step, self.rank, list(range(self.world)))
            ray.train.report(
                {**metrics, "step": step},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=name,
            )
        self.reported.append(step)
        if self.reporter.is_chief:
            progress.emit({"type": "checkpoint", "step": step, "name": name})


class PreemptionCallback(TrainerCallback):
    """SIGTERM on any worker (preemption.py's handler) → after the current optimizer step every
    worker saves a checkpoint at that step and stops: `Preempted` is raised from on_save, after
    ReportCallback (added before this one) has reported it to Ray Train. The workers agree after
    every step with one all-reduce (`agree`, collective.maximum), as `Checkpointer.maybe_save` does.
    At the last step the Trainer saves anyway and training ends normally."""

    def __init__(self, rank: int, agree: Callable[[int], int] = collective.maximum) -> None:
        self.rank = rank
        self.agree = agree
        self.stopping_at: int | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        step = state.global_step
        preemption.note_step(step)
        preempted = bool(self.agree(int(preemption.requested())))
        if preempted and step < state.max_steps:
            self.stopping_at = step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        step = state.global_step
        if step >= state.max_steps:
            preemption.checkpoint_written()  # the last checkpoint is there: a late SIGTERM costs nothing
        elif step == self.stopping_at:
            self.agree(0)  # a barrier: no worker fails (and gets its group torn down) mid-upload
            preemption.stop(step, self.rank)  # raises Preempted


class ProgressCallback(TrainerCallback):
    """Trainer logs → FORGELINE_PROGRESS records (rank 0), with throughput and MFU."""

    def __init__(self, reporter: progress.Reporter, tokens_per_step: int) -> None:
        self.reporter = reporter
        self.tokens_per_step = tokens_per_step
        self._last_step = -1

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        logs = logs or {}
        if "loss" in logs and state.global_step <= state.max_steps and state.global_step != self._last_step:
            self._last_step = state.global_step
            more = {
                k.replace("/", "_"): v
                for k, v in logs.items()
                if k.startswith(("rewards/", "reward", "kl", "logps", "accuracy", "margin", "entropy"))
                and isinstance(v, (int, float))
            }
            self.reporter.step(
                state.global_step,
                float(logs["loss"]),
                float(logs.get("learning_rate", 0.0)),
                grad_norm=logs.get("grad_norm"),
                samples=args.per_device_train_batch_size,
                epoch=round(float(logs.get("epoch", 0.0)), 4),
                **more,
            )
        keep = (
            "eval_loss",
            "eval_rewards/accuracies",
            "eval_rewards/margins",
            "eval_accuracy",
            "eval_margin",
            "eval_kl",
        )
        eval_metrics = {
            k[len("eval_") :]: v
            for k, v in logs.items()
            if k.startswith(keep) and isinstance(v, (int, float))
        }
        if eval_metrics:
            eval_metrics = {
                ("eval_loss" if k == "loss" else k.replace("/", "_")): v for k, v in eval_metrics.items()
            }
            self.reporter.evaluation(state.global_step, eval_metrics)
        if isinstance(logs.get("eval_runtime"), (int, float)) and not self.reporter.in_timed:
            self.reporter.spent("evaluation", logs["eval_runtime"])  # an eval the Trainer ran itself
