"""Checkpoints through Ray Train: save every N steps (and on preemption), resume from the newest
complete one in storage, falling back past broken ones.

A checkpoint holds model, optimizer, scheduler, the step (which fixes the data position: batch
order is a function of the step) and the progress history. Plain DDP: rank 0 writes `state.pt`.
DeepSpeed: every rank writes its ZeRO shards with `engine.save_checkpoint`, and Ray Train merges
the ranks' files into one checkpoint directory in storage.

Layout in storage (`<checkpoints>/<run name>/`, local, a PVC or an object store):

    checkpoint_step_00000040/           one directory per checkpoint, named by its step
        state.pt | zero/...             the weights and optimizer (DDP | DeepSpeed shards)
        forgeline_state.json            step, loss history, tokens seen
        forgeline_complete.rank0.json   completeness marker of each writing rank, written last:
        forgeline_complete.rank1.json   its step, the writing ranks, and every file with its size
    checkpoint_step_00000040_1/         the same step written again (after falling back past it)

The TRL recipes (hf_trainer.py) write the same directories and markers, with transformers'
Trainer checkpoint under `checkpoint/` instead of `state.pt`, and resume by the same rule.

Resume rule: list the run's checkpoint directories (also the one Ray Train registered), newest
step first; skip any that is not complete (a marker missing — for DeepSpeed, one per rank — or a
file missing or of another size than its marker says); load the first complete one; if loading
fails (a corrupt file), say so in an event and try the next. Ray Train's controller registers
reported checkpoints only every 2 s, so the newest written checkpoint is often not the one
`ray.train.get_checkpoint()` returns: storage is the truth. At each restore rank 0 also deletes
the run's broken directories and those beyond `keep`, but never one Ray Train's own checkpoint
list references (Ray deletes those itself, per `num_to_keep`).
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import preemption, storage
from .runtime_info import RuntimeInfo

if TYPE_CHECKING:
    from .optim import TrainEngine

_TAG = "zero"
_STATE = "state.pt"
META = "forgeline_state.json"
_MARKER = "forgeline_complete.rank{rank}.json"
_MARKER_RE = re.compile(r"^forgeline_complete\.rank(\d+)\.json$")
_DIR_RE = re.compile(r"^checkpoint_step_(\d{8})(?:_(\d+))?$")
_RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


# -- naming, completeness, order (pure: tests/test_trainer_units.py) ----------------------------


def dir_name(step: int, taken: set[str] | frozenset[str] = frozenset()) -> str:
    """`checkpoint_step_00000040`, or `…_1`, `…_2` when that name is taken already."""
    base = f"checkpoint_step_{step:08d}"
    if base not in taken:
        return base
    n = 1
    while f"{base}_{n}" in taken:
        n += 1
    return f"{base}_{n}"


def parse_dir_name(name: str) -> tuple[int, int] | None:
    """(step, generation) of a checkpoint directory's name; None for anything else."""
    m = _DIR_RE.match(name)
    return None if m is None else (int(m.group(1)), int(m.group(2) or 0))


def marker(step: int, rank: int, writers: list[int], files: dict[str, int]) -> dict[str, Any]:
    return {"step": step, "rank": rank, "writers": writers, "files": files}


def problem(step: int, files: dict[str, int], markers: dict[int, Any]) -> str | None:
    """Why a checkpoint directory with these files (relative path → size) and markers (rank →
    parsed marker, or None if unreadable) is not complete; None when it is."""
    if markers.get(0) is None:
        return "no completeness marker: the save or its upload did not finish"
    writers = markers[0].get("writers", [0])
    for rank in writers:
        m = markers.get(rank)
        if m is None:
            return f"worker {rank}'s files are missing (no marker of rank {rank}, of writers {writers})"
        if m.get("step") != step:
            return f"rank {rank}'s marker is for step {m.get('step')}, not {step}"
        for rel, size in sorted(m.get("files", {}).items()):
            if rel not in files:
                return f"{rel} is missing (written by worker {rank})"
            if files[rel] != size:
                return f"{rel} is {files[rel]} bytes, {size} were written (truncated or overwritten)"
    return None


@dataclass(frozen=True)
class Candidate:
    """A checkpoint directory of this run, as found in storage."""

    name: str
    step: int | None
    """None: a checkpoint Ray Train registered under another name (older Forgeline), step unknown."""
    problem: str | None = None
    """Why it cannot be loaded without trying (None: complete)."""
    generation: int = 0


def candidates(
    listing: dict[str, dict[str, int]], markers: dict[str, dict[int, Any]], registered: str | None
) -> list[Candidate]:
    """The run's checkpoints, newest first: step directories by (step, generation) descending,
    then Ray Train's registered checkpoint if it is not one of them."""
    out = []
    for name, files in listing.items():
        parsed = parse_dir_name(name)
        if parsed is None:
            continue
        step, generation = parsed
        out.append(Candidate(name, step, problem(step, files, markers.get(name, {})), generation))
    out.sort(key=lambda c: (c.step or 0, c.generation), reverse=True)
    if registered and parse_dir_name(registered) is None:
        out.append(Candidate(registered, None))
    return out


def to_prune(cands: list[Candidate], failed: set[str], keep: int, referenced: set[str]) -> list[str]:
    """Directories to delete at a restore: broken ones (incomplete or failing to load) and complete
    ones beyond the newest `keep` — never one Ray Train's checkpoint list references."""
    out, kept = [], 0
    for c in cands:
        if c.step is None or c.name in referenced:
            continue
        if c.problem is not None or c.name in failed:
            out.append(c.name)
        elif kept < keep:
            kept += 1
        else:
            out.append(c.name)
    return out


# -- the run's storage -----------------------------------------------------------------------


@dataclass
class RunStore:
    """The run's directory (`storage_path/run_name`) on a pyarrow filesystem: local, or s3:// etc."""

    fs: Any
    """pyarrow.fs.FileSystem (Ray Train's own StorageContext.storage_filesystem)."""
    root: str

    @classmethod
    def current(cls) -> RunStore:
        """Where Ray Train writes this run's checkpoints."""
        import ray.train

        ctx = ray.train.get_context().get_storage()
        return cls(ctx.storage_filesystem, ctx.experiment_fs_path)

    def listing(self) -> dict[str, dict[str, int]]:
        """Checkpoint directory name → {relative file path: size}."""
        import pyarrow.fs as pafs

        try:
            entries = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        except FileNotFoundError:
            return {}
        out: dict[str, dict[str, int]] = {}
        for entry in entries:
            if entry.type != pafs.FileType.Directory or parse_dir_name(entry.base_name) is None:
                continue
            files = self.fs.get_file_info(pafs.FileSelector(entry.path, recursive=True, allow_not_found=True))
            prefix = entry.path.rstrip("/") + "/"
            out[entry.base_name] = {
                f.path[len(prefix) :]: f.size for f in files if f.type == pafs.FileType.File
            }
        return out

    def read_text(self, rel: str) -> str | None:
        try:
            with self.fs.open_input_stream(f"{self.root}/{rel}") as f:
                return f.read().decode()
        except (FileNotFoundError, OSError):
            return None

    def markers(self, name: str, files: dict[str, int]) -> dict[int, Any]:
        out: dict[int, Any] = {}
        for rel in files:
            m = _MARKER_RE.match(rel)
            if m:
                text = self.read_text(f"{name}/{rel}")
                try:
                    out[int(m.group(1))] = json.loads(text) if text is not None else None
                except ValueError:
                    out[int(m.group(1))] = None
        return out

    @contextlib.contextmanager
    def local_dir(self, name: str) -> Iterator[Path]:
        """The checkpoint as a local directory (a download for object stores)."""
        import pyarrow.fs as pafs

        if isinstance(self.fs, pafs.LocalFileSystem):
            yield Path(self.root) / name
            return
        with tempfile.TemporaryDirectory(prefix="forgeline-restore-") as tmp:
            pafs.copy_files(f"{self.root}/{name}", tmp, source_filesystem=self.fs)
            yield Path(tmp)

    def download(self, name: str, into: Path) -> Path:
        """The checkpoint as a local directory that stays (`into/name` for object stores) until
        the caller removes `into`."""
        import pyarrow.fs as pafs

        if isinstance(self.fs, pafs.LocalFileSystem):
            return Path(self.root) / name
        target = into / name
        target.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(f"{self.root}/{name}", str(target), source_filesystem=self.fs)
        return target

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.delete_dir(f"{self.root}/{name}")


# -- the checkpointer ------------------------------------------------------------------------


@dataclass
class Checkpointer:
    rt: RuntimeInfo
    interval: int
    trainable_only: bool = False
    """Save just the parameters that train (PEFT adapters, prompt embeddings): the frozen base is
    reloaded from the base model on resume."""
    keep: int = 2
    grace_seconds: float = 120.0
    """spec.preemption.gracePeriodSeconds."""
    saved_steps: list[int] = field(default_factory=list)
    _taken: set[str] = field(default_factory=set, init=False, repr=False)
    """Directory names in storage (at the restore, and since): a step written again gets a new one."""

    @classmethod
    def for_job(cls, job: Any, trainable_only: bool = False) -> Checkpointer:
        """From the job's spec.checkpointing and spec.preemption."""
        spec = job.cfg.spec
        return cls(
            job.rt,
            spec.checkpointing.interval_steps,
            trainable_only=trainable_only,
            keep=spec.checkpointing.keep,
            grace_seconds=spec.preemption.grace_period_seconds,
        )

    def _model_state(self, model: Any) -> dict[str, Any]:
        bare = getattr(model, "module", model)
        if self.trainable_only:
            return {n: p.detach().cpu() for n, p in bare.named_parameters() if p.requires_grad}
        return bare.state_dict()

    # -- saving --------------------------------------------------------------------------------

    def maybe_save(self, step: int, eng: TrainEngine, reporter: Any, metrics: dict[str, float]) -> bool:
        """After every step: save at every `interval` steps, at the last one, and when any worker
        got SIGTERM — then stop with Preempted (the workers agree on it with one all-reduce)."""
        from . import collective

        preemption.note_step(step)
        preempted = bool(collective.maximum(int(preemption.requested())))
        due = step % self.interval == 0 or step == eng.total_steps
        if due or preempted:
            self.save(step, eng, reporter, metrics)
        if step == eng.total_steps:
            preemption.checkpoint_written()  # the last checkpoint is there: a late SIGTERM costs nothing
        elif preempted:
            preemption.stop(step, self.rt.rank)  # raises Preempted
        return due or preempted

    def save(self, step: int, eng: TrainEngine, reporter: Any, metrics: dict[str, float]) -> None:
        with reporter.timed("checkpointSave"):
            self._save(step, eng, reporter, metrics)

    def _save(self, step: int, eng: TrainEngine, reporter: Any, metrics: dict[str, float]) -> None:
        import ray.train
        import torch

        meta = {
            "step": step,
            "history": reporter.history,
            "eval_history": reporter.eval_history,
            "tokens_seen": reporter.tokens_seen,
        }
        name = dir_name(step, self._taken)
        self._taken.add(name)
        with tempfile.TemporaryDirectory(prefix="forgeline-ckpt-") as tmp:
            d = Path(tmp)
            if eng.engine is not None:
                eng.engine.save_checkpoint(str(d), tag=_TAG, client_state={"step": step})
                if self.rt.rank == 0:
                    (d / META).write_text(json.dumps(meta))
                write_marker(d, step, self.rt.rank, list(range(self.rt.world)))
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
                (d / META).write_text(json.dumps(meta))
                write_marker(d, step, 0, [0])
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            else:
                checkpoint = None
            ray.train.report({**metrics, "step": step}, checkpoint=checkpoint, checkpoint_dir_name=name)
        self.saved_steps.append(step)
        if reporter.is_chief:
            from .progress import emit

            emit({"type": "checkpoint", "step": step, "name": name})

    # -- restoring -----------------------------------------------------------------------------

    def restore(
        self, eng: TrainEngine, reporter: Any, resume_from: str | None = None, work_dir: str | None = None
    ) -> int:
        """The step to start from: the newest complete checkpoint of this run that loads, else
        `resumeFrom`, else 0. Also catches SIGTERM from here on (graceful preemption). Timed as
        checkpointRestore; the reporter learns the step (goodput's redone work counts from it)."""
        with reporter.timed("checkpointRestore"):
            step = self._restore(eng, reporter, resume_from, work_dir)
        reporter.resumed_from = step
        return step

    def _restore(
        self, eng: TrainEngine, reporter: Any, resume_from: str | None = None, work_dir: str | None = None
    ) -> int:
        import ray.train

        why = preemption.install(self.grace_seconds)
        if why is not None:
            reporter.event("graceful preemption unavailable: SIGTERM stops the worker at once", why=why)
        store = RunStore.current()
        registered = ray.train.get_checkpoint()
        registered_name = None if registered is None else Path(registered.path.rstrip("/")).name
        listing = store.listing()
        self._taken = set(listing)
        markers = {name: store.markers(name, files) for name, files in listing.items()}
        cands = candidates(listing, markers, registered_name)
        step, failed = self._load_newest(cands, store, registered, eng, reporter)
        self._prune(store, cands, failed)
        if step is not None:
            return step
        if cands:
            reporter.event(
                "no checkpoint of this run could be loaded",
                skipped=[c.name for c in cands],
                then="resumeFrom" if resume_from else "step 0",
            )
        if resume_from:
            location = storage.local_copy(storage.resolve(resume_from, work_dir), "/tmp/forgeline-resume")
            return self._load(Path(location), eng, reporter)
        return 0

    def _load_newest(
        self, cands: list[Candidate], store: RunStore, registered: Any, eng: TrainEngine, reporter: Any
    ) -> tuple[int | None, set[str]]:
        """(step loaded, or None; names that failed to load). Every worker tries the same
        candidates in the same order and they agree after each (one all-reduce)."""
        from . import collective, progress

        failed: set[str] = set()
        for c in cands:
            if c.problem is not None:
                reporter.event("skipped checkpoint", checkpoint=c.name, step=c.step, why=c.problem)
                continue
            try:
                ctx = store.local_dir(c.name) if c.step is not None else registered.as_directory()
                with ctx as d:
                    step = self._load(Path(d), eng, reporter, announce=False)
                error = None
            except Exception as exc:  # noqa: BLE001 - a broken checkpoint: fall back to the previous one
                step, error = None, f"{type(exc).__name__}: {exc}"[:500]
            if not collective.maximum(int(error is not None)):
                reporter.event("resumed from checkpoint", step=step, checkpoint=c.name)
                return step, failed
            failed.add(c.name)
            if error is not None:
                progress.emit(
                    {
                        "type": "event",
                        "message": "skipped checkpoint",
                        "checkpoint": c.name,
                        "step": c.step,
                        "rank": self.rt.rank,
                        "why": error,
                    }
                )
        return None, failed

    def _prune(self, store: RunStore, cands: list[Candidate], failed: set[str]) -> None:
        prune(store, cands, failed, self.keep, self.rt.rank)

    def _load(self, d: Path, eng: TrainEngine, reporter: Any, announce: bool = True) -> int:
        import torch

        if eng.engine is not None:
            if not (d / _TAG).exists():
                raise FileNotFoundError(f"{d} holds no DeepSpeed checkpoint (tag '{_TAG}')")
            path, client = eng.engine.load_checkpoint(
                str(d), tag=_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if path is None or client is None:
                raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {d}")
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
        meta_path = d / META
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            reporter.history = meta.get("history", [])
            reporter.eval_history = meta.get("eval_history", [])
            reporter.tokens_seen = meta.get("tokens_seen", 0)
        if announce:
            reporter.event("resumed from checkpoint", step=step)
        return step

    def barrier(self) -> None:
        import torch

        if torch.distributed.is_initialized():
            torch.distributed.barrier()


def prune(store: RunStore, cands: list[Candidate], failed: set[str], keep: int, rank: int) -> None:
    """Rank 0, once every worker has listed (and loaded): delete broken and surplus directories
    that Ray Train's checkpoint list does not reference."""
    from . import collective

    collective.maximum(0)  # a barrier: no worker is still reading the listing
    if rank != 0:
        return
    snapshot = store.read_text(_RAY_SNAPSHOT) or ""
    referenced = {c.name for c in cands if c.name in snapshot}
    for name in to_prune(cands, failed, keep, referenced):
        store.delete(name)


def write_marker(d: Path, step: int, rank: int, writers: list[int]) -> None:
    """The completeness marker of one writing rank, last: its files and their sizes."""
    files = {
        p.relative_to(d).as_posix(): p.stat().st_size
        for p in sorted(d.rglob("*"))
        if p.is_file() and not _MARKER_RE.match(p.name)
    }
    (d / _MARKER.format(rank=rank)).write_text(json.dumps(marker(step, rank, writers, files)))
