"""Our checkpoint manager: atomic saves, keep-last-K, best-by-metric, resume and run-folder guard.

A run folder looks like this:

    <run>/config.toml                    the resolved config of the run
    <run>/checkpoints/step_00010000.pt   one file per checkpoint (the last `keep_last` are kept)
    <run>/checkpoints/best.pt            the best so far by `best_metric` (with best.json)
    <run>/tensorboard/                   event files

A checkpoint is a plain dict saved with `torch.save` and read with `weights_only=True`:
`{"illm_checkpoint": 1, "stage", "step", "models": {name: state_dict}, "optimizers",
"schedulers", "scaler", "rng": [state of process 0, 1, ...], "data", "metrics", "config"}`.
Every write goes to a temporary file in the same folder and is renamed into place, so a
crash never leaves a half-written checkpoint behind a valid name.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from illm.errors import IllmError, one_line
from illm.faults import WriteRecorder, describe_write_error, share_write_failure
from illm.files import atomic_open, atomic_write_bytes

FORMAT_VERSION = 1
CHECKPOINT_MARK = "illm_checkpoint"
STEP_FILE = re.compile(r"^step_(\d{8,})\.pt$")
# The names `illm.files.atomic_open` gives its temporary files, for the files of a run folder.
STALE_TEMPORARY = re.compile(r"^\.(step_\d{8,}\.pt|best\.pt|best\.json|config\.toml)\.[0-9a-f]{8}\.tmp$")


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete step checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    checkpoints = step_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file, memory-mapped (never runs code: weights_only)."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise IllmError(f"checkpoint not found: {path}") from None
    except Exception as error:  # unpickling errors come in many types
        raise IllmError(
            f"{path}: not a readable checkpoint ({type(error).__name__}: {one_line(error)})"
        ) from None
    return checked_checkpoint(checkpoint, path)


def is_checkpoint(content) -> bool:
    """Whether loaded file content is one of our training checkpoints (of any format version)."""
    return isinstance(content, dict) and CHECKPOINT_MARK in content


def checked_checkpoint(content, path: str | Path) -> dict:
    """`content` (a loaded file) when it is a training checkpoint this version reads."""
    if not is_checkpoint(content) or content[CHECKPOINT_MARK] != FORMAT_VERSION:
        raise IllmError(f"{path}: not an illm training checkpoint (format {FORMAT_VERSION})")
    return content


def checkpoint_model(content, path: str | Path, name: str) -> dict:
    """The state dict of model `name` in a loaded training checkpoint."""
    models = checked_checkpoint(content, path).get("models")
    if not isinstance(models, dict) or name not in models:
        found = ", ".join(models) if isinstance(models, dict) else "none"
        raise IllmError(f"{path}: training checkpoint without {name} weights (it has: {found})")
    return models[name]


def latest_intact_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest step checkpoint of a run that is intact (every byte checked), or None."""
    return next((path for path in reversed(step_checkpoints(run_dir)) if not _damage(path)), None)


def resolve_checkpoint(source: str | Path) -> Path:
    """A checkpoint file, or the latest checkpoint of a run folder."""
    source = Path(source)
    if source.is_dir():
        latest = latest_checkpoint(source)
        if latest is None:
            expected = source / "checkpoints" / "step_<8-digit step>.pt"
            raise IllmError(f"{source}: a folder without checkpoints (expected {expected})")
        return latest
    return source


def resume_point(run_dir: str | Path, resume_from: str | Path = "") -> Path | None:
    """The checkpoint that a resumed run continues from: ``resume_from`` when given (the config
    key `run.resume_from`), else the run's latest step checkpoint, or None when there is none.

    A damaged latest checkpoint (truncated by a full disk, or by a copy made outside our atomic
    writes) is refused with a one-line error that names the last intact one and the two ways to
    continue: `run.resume_from=<it>`, or moving the damaged file aside. Nothing is deleted.
    """
    if resume_from:
        path = Path(resume_from)
        if not path.is_file():
            raise IllmError(f"run.resume_from={path}: no such checkpoint file")
        damage = _damage(path)
        if damage:
            raise IllmError(f"run.resume_from={path}: unreadable checkpoint ({damage})")
        return path
    checkpoints = step_checkpoints(run_dir)
    if not checkpoints:
        return None
    latest = checkpoints[-1]
    damage = _damage(latest)
    if not damage:
        return latest
    intact = next((path for path in reversed(checkpoints[:-1]) if not _damage(path)), None)
    if intact is None:
        raise IllmError(
            f"{latest}: unreadable checkpoint ({damage}), and no intact one before it; "
            f"move it aside to start over (run.overwrite=true moves the whole run folder aside)"
        )
    raise IllmError(
        f"{latest}: unreadable checkpoint ({damage}); the last intact one is {intact}: continue from it "
        f"with run.resume_from={intact}, or move {latest.name} out of {latest.parent} (nothing was deleted)"
    )


def _damage(path: Path) -> str:
    """Why ``path`` is not an intact checkpoint file, or "" when it is: `torch.save` writes a zip
    archive, whose directory sits at the end (truncation) and whose records carry CRCs (every
    byte is read to check them, without unpickling anything)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        return one_line(error)
    return f"CRC mismatch in {bad}" if bad else ""


# --- random number generator state ------------------------------------------------------------------


def rng_state() -> dict:
    """The state of every RNG this process uses, in a weights_only-loadable form: on CUDA the RNG
    of this process's current device only (a resumed run may see another number of GPUs)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, counts, *rest = state["python"]
    random.setstate((version, tuple(counts), *rest))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible GPU's, by device index
            index = torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


# --- the manager ----------------------------------------------------------------------------------


@dataclass
class TrainingState:
    """Everything a checkpoint holds besides its step: the loop's models, optimizers, LR
    schedules and data stream (a `state_dict`/`load_state_dict` each), by name."""

    models: dict
    optimizers: dict
    schedulers: dict
    stream: object
    learning_rates: dict  # optimizer name -> the configured base LR, applied again on resume


class CheckpointManager:
    """Owns a run's checkpoints: when to save (`due`), what a checkpoint holds (`save`,
    `restore`), how many to keep (`keep_last` intact ones) and which is `best.pt`.

    Every process calls `save` and `restore` (the RNG states are gathered from all of them);
    only the main process writes.
    """

    def __init__(self, run_dir: str | Path, checkpoint_cfg, accelerator, max_steps: int, config_toml: str):
        self.config_toml = config_toml  # the run's resolved config, saved in every checkpoint
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / "checkpoints"
        self.cfg = checkpoint_cfg
        self.accelerator = accelerator
        self.max_steps = max_steps
        self._known_intact: set[Path] = set()

    def due(self, step: int) -> bool:
        return step % self.cfg.every == 0 or step == self.max_steps

    def path_for(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}.pt"

    def latest(self) -> Path | None:
        return latest_checkpoint(self.run_dir)

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files our atomic writer left in this run folder when a process was
        killed during a write (`.step_00001000.pt.<8 hex>.tmp` and the like); nothing else."""
        stale = [
            path
            for folder in (self.run_dir, self.folder)
            if folder.is_dir()
            for path in folder.iterdir()
            if STALE_TEMPORARY.match(path.name)
        ]
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def latest_intact(self) -> Path | None:
        return next((p for p in reversed(step_checkpoints(self.run_dir)) if self.intact(p)), None)

    # --- writing ---

    def save(self, step: int, state: TrainingState, val_metrics: dict | None = None) -> None:
        """Write the checkpoint of `step` (all processes call this). `val_metrics` are those of a
        validation run at this same step, or None: only then is the checkpoint a `best.pt`
        candidate."""
        accelerator = self.accelerator
        rng_states = gather_rng_states(accelerator)
        failure = ""
        if accelerator.is_main_process:
            checkpoint = {
                CHECKPOINT_MARK: FORMAT_VERSION,
                "step": step,
                "models": {
                    name: accelerator.unwrap_model(m).state_dict() for name, m in state.models.items()
                },
                "optimizers": {name: opt.state_dict() for name, opt in state.optimizers.items()},
                "schedulers": {name: s.state_dict() for name, s in state.schedulers.items()},
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "rng": rng_states,
                "data": state.stream.state_dict(),
                "metrics": dict(val_metrics or {}),
                "config": self.config_toml,
            }
            failure = self.write_and_keep(checkpoint, val_metrics)
        share_write_failure(accelerator, failure)

    def write_and_keep(self, checkpoint: dict, val_metrics: dict | None) -> str:
        """Write, prune and update best.pt; returns why it failed ("" when it did not). A failed
        write leaves the earlier checkpoints as they were (atomic writes)."""
        path = self.path_for(checkpoint["step"])
        recorder = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(path) as file:
                recorder = WriteRecorder(file)
                torch.save(checkpoint, recorder)
            self._known_intact.add(path)
            self.prune()
            if val_metrics is not None:
                self.consider_best(path, checkpoint["step"], val_metrics)
        except (OSError, RuntimeError) as error:
            last = self.latest_intact()
            return (
                f"could not write the checkpoint {path} ({describe_write_error(error, recorder)}); "
                f"the last intact checkpoint is {last}: free space, then run the same command to resume"
            )
        return ""

    def intact(self, path: Path) -> bool:
        """Whether `path` is an intact checkpoint (files this manager wrote are known to be)."""
        if path not in self._known_intact and not _damage(path):
            self._known_intact.add(path)
        return path in self._known_intact

    def prune(self) -> None:
        """Delete intact step checkpoints beyond the newest `keep_last` intact ones. A damaged file
        is left where it is and never counts (so the newest intact checkpoint is never deleted)."""
        intact = [path for path in step_checkpoints(self.run_dir) if self.intact(path)]
        for old in intact[: -self.cfg.keep_last]:
            old.unlink(missing_ok=True)
            self._known_intact.discard(old)

    def consider_best(self, path: Path, step: int, val_metrics: dict) -> None:
        """Copy `path` to `best.pt` when its metric beats the recorded best. A record written for
        another metric (the config changed) is replaced, not compared."""
        metric = self.cfg.best_metric
        if not metric or metric not in val_metrics:
            return
        value = float(val_metrics[metric])
        if not math.isfinite(value):
            return
        best = read_best_record(self.folder)
        if best is not None and best.get("metric") == metric:
            better = value > best["value"] if self.cfg.best_mode == "max" else value < best["value"]
            if not better:
                return
        with atomic_open(self.folder / "best.pt") as file, path.open("rb") as source:
            shutil.copyfileobj(source, file)
        record = {"metric": metric, "value": value, "step": step}
        atomic_write_bytes(self.folder / "best.json", json.dumps(record).encode())

    # --- reading ---

    def restore(self, checkpoint: dict, state: TrainingState) -> int:
        """Load `checkpoint` (as `save` wrote it) into `state` and this process's RNGs; returns
        its step, the number of iterations done."""
        accelerator = self.accelerator
        for name, model in state.models.items():
            accelerator.unwrap_model(model).load_state_dict(checkpoint["models"][name])
        for name, optimizer in state.optimizers.items():
            optimizer.load_state_dict(checkpoint["optimizers"][name])
        for name, scheduler in state.schedulers.items():
            scheduler.load_state_dict(checkpoint["schedulers"][name])
        if checkpoint.get("scaler") and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(checkpoint["scaler"])
        state.stream.load_state_dict(checkpoint["data"])
        for name, lr in state.learning_rates.items():
            set_base_lr(state.optimizers[name], state.schedulers.get(name), lr)
        states = checkpoint["rng"]
        set_rng_state(states[accelerator.process_index % len(states)])
        return checkpoint["step"]


def set_base_lr(optimizer, scheduler, lr: float) -> None:
    """Make `lr` the base LR of `optimizer` (and of its LR `scheduler`, if any) from the current
    iteration on: a restored optimizer would otherwise keep the LR of the run it was saved from."""
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch) if scheduler is not None else 1.0
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
        group["lr"] = lr * factor
    if scheduler is not None:
        scheduler.base_lrs = [lr] * len(optimizer.param_groups)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def read_best_record(folder: Path) -> dict | None:
    """`best.json` of a checkpoints folder, or None when there is none (or it is unreadable)."""
    try:
        record = json.loads((folder / "best.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "value" in record else None


def gather_rng_states(accelerator) -> list[dict]:
    """The RNG state of every process, in process order (a collective: every process calls it)."""
    states = [rng_state()]
    if accelerator.num_processes > 1:
        # Sent as torch.save bytes: all_gather_object cannot carry tensors in this torch version.
        buffer = io.BytesIO()
        torch.save(states[0], buffer)
        gathered = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(gathered, buffer.getvalue())
        states = [torch.load(io.BytesIO(data), weights_only=True) for data in gathered]
    return states


def prepare_run_dir(
    run_dir: str | Path, config_toml: str, resume: bool, overwrite: bool, move: bool = True
) -> bool:
    """Check the run folder before any work; returns True when the run resumes.

    A folder with checkpoints made by the same config (training length aside) resumes; a
    different config is refused unless `resume` (continue it anyway) or `overwrite` (move
    the old run aside, nothing is deleted). Every process may call it; only the one with
    `move` moves folders, and all of them reach the same answer.
    """
    run_dir = Path(run_dir)
    has_checkpoints = bool(step_checkpoints(run_dir))
    saved_config = run_dir / "config.toml"
    if not has_checkpoints:
        return False
    if overwrite:
        if move:
            aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            run_dir.rename(aside)
            print(f"run.overwrite: moved the previous run to {aside}")
        return False
    if resume:
        return True
    previous = saved_config.read_text() if saved_config.exists() else ""
    differences = _config_differences(previous, config_toml)
    if differences:
        keys = ", ".join(differences[:5]) + (" ..." if len(differences) > 5 else "")
        raise IllmError(
            f"{run_dir} holds checkpoints of another experiment (config differs in: {keys}); "
            "pass run.resume=true to continue it, run.overwrite=true to start over, or choose another run.dir"
        )
    return True


# Keys that may change between the starts of one run without making it another experiment.
RESUMABLE_CHANGES = {
    "train.max_steps",
    "run.resume",
    "run.resume_from",
    "run.overwrite",
    "data.num_workers",
    "checkpoint.every",
    "logging.every",
    "logging.val_every",
    "optim.lr",  # a lower LR to continue a diverged run: applied on resume (`set_base_lr`)
    "optim.disc_lr",
}


def _config_differences(old_toml: str, new_toml: str) -> list[str]:
    from illm.config import tomllib

    try:
        old = tomllib.loads(old_toml)
    except tomllib.TOMLDecodeError:
        return ["config.toml (unreadable)"]
    new = tomllib.loads(new_toml)
    keys = {f"{s}.{k}" for t in (old, new) for s, table in t.items() for k in table}
    flat = lambda t, key: t.get(key.split(".")[0], {}).get(key.split(".")[1])  # noqa: E731
    return sorted(k for k in keys - RESUMABLE_CHANGES if flat(old, k) != flat(new, k))
