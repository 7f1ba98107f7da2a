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

import json
import random
import re
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from illm.errors import IllmError, one_line
from illm.files import atomic_open, atomic_write_bytes

FORMAT_VERSION = 1
STEP_FILE = re.compile(r"^step_(\d{8,})\.pt$")


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
    """Load a checkpoint file (never runs code: weights_only)."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise IllmError(f"checkpoint not found: {path}") from None
    except Exception as error:  # unpickling errors come in many types
        raise IllmError(
            f"{path}: not a readable checkpoint ({type(error).__name__}: {one_line(error)})"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("illm_checkpoint") != FORMAT_VERSION:
        raise IllmError(f"{path}: not an illm training checkpoint")
    return checkpoint


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


class CheckpointManager:
    """Saves and finds the checkpoints of one run folder. Only the main process writes."""

    def __init__(
        self, run_dir: str | Path, keep_last: int = 3, best_metric: str = "", best_mode: str = "max"
    ):
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / "checkpoints"
        self.keep_last = keep_last
        self.best_metric = best_metric
        self.best_mode = best_mode

    def path_for(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}.pt"

    def latest(self) -> Path | None:
        return latest_checkpoint(self.run_dir)

    def save(self, checkpoint: dict) -> Path:
        """Write a step checkpoint atomically, prune old ones, update best.pt when it improved."""
        checkpoint = {"illm_checkpoint": FORMAT_VERSION, **checkpoint}
        path = self.path_for(checkpoint["step"])
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as file:
            torch.save(checkpoint, file)
        for old in step_checkpoints(self.run_dir)[: -self.keep_last]:
            old.unlink(missing_ok=True)
        self._update_best(path, checkpoint.get("metrics") or {})
        return path

    def _update_best(self, path: Path, metrics: dict) -> None:
        if not self.best_metric or self.best_metric not in metrics:
            return
        value = float(metrics[self.best_metric])
        record_path = self.folder / "best.json"
        if record_path.exists():
            previous = json.loads(record_path.read_text())["value"]
            better = value > previous if self.best_mode == "max" else value < previous
            if not better:
                return
        with atomic_open(self.folder / "best.pt") as file, path.open("rb") as source:
            shutil.copyfileobj(source, file)
        record = {"metric": self.best_metric, "value": value, "step": int(path.stem.split("_")[1])}
        atomic_write_bytes(record_path, json.dumps(record).encode())


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
