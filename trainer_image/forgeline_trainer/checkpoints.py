"""Checkpoints through Ray Train: save every N steps, keep K (Ray's CheckpointConfig), resume.

A checkpoint holds model, optimizer, scheduler, the step (which fixes the data position: batch
order is a function of the step) and the progress history. Plain DDP: rank 0 writes `state.pt`.
DeepSpeed: every rank writes its ZeRO shards with `engine.save_checkpoint`, and Ray Train merges
the ranks' files into one checkpoint directory in storage.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import storage
from .runtime import RuntimeInfo

if TYPE_CHECKING:
    from .optim import TrainEngine

_TAG = "zero"
_STATE = "state.pt"
_META = "forgeline_state.json"


class Checkpointer:
    def __init__(self, rt: RuntimeInfo, interval: int, trainable_only: bool = False) -> None:
        """trainable_only: save just the parameters that train (PEFT adapters, prompt embeddings):
        the frozen base is reloaded from the base model on resume."""
        self.rt = rt
        self.interval = interval
        self.trainable_only = trainable_only
        self.saved_steps: list[int] = []

    def _model_state(self, model: Any) -> dict[str, Any]:
        bare = getattr(model, "module", model)
        if self.trainable_only:
            return {n: p.detach().cpu() for n, p in bare.named_parameters() if p.requires_grad}
        return bare.state_dict()

    def maybe_save(self, step: int, eng: TrainEngine, reporter: Any, metrics: dict[str, float]) -> bool:
        """Save at every `interval` steps and at the last one."""
        if step % self.interval and step != eng.total_steps:
            return False
        self.save(step, eng, reporter, metrics)
        return True

    def save(self, step: int, eng: TrainEngine, reporter: Any, metrics: dict[str, float]) -> None:
        import ray.train
        import torch

        meta = {
            "step": step,
            "history": reporter.history,
            "eval_history": reporter.eval_history,
            "tokens_seen": reporter.tokens_seen,
        }
        with tempfile.TemporaryDirectory(prefix="forgeline-ckpt-") as tmp:
            d = Path(tmp)
            if eng.engine is not None:
                eng.engine.save_checkpoint(str(d), tag=_TAG, client_state={"step": step})
                if self.rt.rank == 0:
                    (d / _META).write_text(json.dumps(meta))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            elif self.rt.rank == 0:
                torch.save(
                    {
                        "model": self._model_state(eng.model),
                        "optimizer": eng.optimizer.state_dict(),
                        "scheduler": eng.scheduler.state_dict(),
                        "step": step,
                    },
                    d / _STATE,
                )
                (d / _META).write_text(json.dumps(meta))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            else:
                checkpoint = None
            ray.train.report({**metrics, "step": step}, checkpoint=checkpoint)
        self.saved_steps.append(step)
        if reporter.is_chief:
            from .progress import emit

            emit({"type": "checkpoint", "step": step})

    def restore(
        self, eng: TrainEngine, reporter: Any, resume_from: str | None = None, work_dir: str | None = None
    ) -> int:
        """The step to start from: the newest Ray Train checkpoint of this run, else `resumeFrom`,
        else 0."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                return self._load(Path(d), eng, reporter)
        if resume_from:
            location = storage.local_copy(storage.resolve(resume_from, work_dir), "/tmp/forgeline-resume")
            return self._load(Path(location), eng, reporter)
        return 0

    def _load(self, d: Path, eng: TrainEngine, reporter: Any) -> int:
        import torch

        if eng.engine is not None:
            if not (d / _TAG).exists():
                raise FileNotFoundError(f"{d} holds no DeepSpeed checkpoint (tag '{_TAG}')")
            _, client = eng.engine.load_checkpoint(
                str(d), tag=_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            step = int(client["step"])
        else:
            state = torch.load(d / _STATE, map_location="cpu", weights_only=False)
            missing = getattr(eng.model, "module", eng.model).load_state_dict(
                state["model"], strict=not self.trainable_only
            )
            if self.trainable_only and missing.unexpected_keys:
                raise RuntimeError(f"checkpoint does not fit the model: {missing.unexpected_keys[:5]}")
            eng.optimizer.load_state_dict(state["optimizer"])
            eng.scheduler.load_state_dict(state["scheduler"])
            step = int(state["step"])
        meta_path = d / _META
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            reporter.history = meta.get("history", [])
            reporter.eval_history = meta.get("eval_history", [])
            reporter.tokens_seen = meta.get("tokens_seen", 0)
        reporter.event("resumed from checkpoint", step=step)
        return step

    def barrier(self) -> None:
        import torch

        if torch.distributed.is_initialized():
            torch.distributed.barrier()
