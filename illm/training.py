"""Pieces every training stage shares: Accelerator setup, run folder, data streams, progress.

The loops themselves live in `illm/stages/` and read top to bottom; this module keeps them
short by holding what is the same in all three.
"""

from __future__ import annotations

import io
import math
import resource
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch import Tensor, nn
from tqdm import tqdm

from illm import config as config_io
from illm.checkpoint import (
    CheckpointManager,
    prepare_run_dir,
    read_checkpoint,
    resume_point,
    rng_state,
    set_rng_state,
)
from illm.data import ImageFolder, make_loader, train_transform, val_transform
from illm.errors import ConfigError, IllmError
from illm.files import atomic_write_bytes
from illm.logger import TensorBoardLogger


def run_main(main, argv=None) -> None:
    """Run a stage's `main`, turning user errors into one line on stderr and exit code 1."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except IllmError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def parse_args(argv: list[str], usage: str) -> tuple[str | None, list[str]]:
    """`CONFIG.toml [section.key=value ...]`: the config path and the overrides."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        sys.exit(0 if argv else 2)
    path, overrides = argv[0], argv[1:]
    if "=" in path:
        raise IllmError(f"the first argument must be a config file, got '{path}'")
    return path, overrides


@dataclass
class Run:
    """The run-wide objects a training loop needs."""

    config: object
    accelerator: Accelerator
    logger: TensorBoardLogger
    checkpoints: CheckpointManager
    resume_from: Path | None
    run_dir: Path


def start_run(config, stage: str, broadcast_buffers: bool = True) -> Run:
    """Accelerator, seeds, run-folder check (resume / refuse / overwrite), config and logger.

    `broadcast_buffers=False` stops DDP from copying the main process's buffers to the others
    before every forward (stage 0 keeps per-process codebook hit counters and sums them itself).
    """
    # One process may run several experiments (the demo's stages, a --sweep-index run, tests), each
    # with its own precision; Accelerate keeps the first one's unless its shared state is reset
    # (the process group stays). No public API resets it, hence the private call.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=config.train.mixed_precision,
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=broadcast_buffers)
        ],
    )
    set_seed(config.run.seed + accelerator.process_index)
    run_dir = Path(config.run.dir)
    config_toml = config_io.to_toml(config)
    resuming = prepare_run_dir(
        run_dir, config_toml, config.run.resume, config.run.overwrite, move=accelerator.is_main_process
    )
    accelerator.wait_for_everyone()
    checkpoints = CheckpointManager(
        run_dir, config.checkpoint.keep_last, config.checkpoint.best_metric, config.checkpoint.best_mode
    )
    resume_from = (
        resume_point(run_dir, config.run.resume_from) if resuming or config.run.resume_from else None
    )
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "config.toml", config_toml.encode())
    logger = TensorBoardLogger(run_dir, enabled=accelerator.is_main_process)
    logger.text("config", "```toml\n" + config_toml + "\n```")
    if accelerator.is_main_process:
        where = f"resuming from {resume_from}" if resume_from else "new run"
        print(
            f"[{stage}] {where}: {run_dir} | processes: {accelerator.num_processes} | device: "
            f"{accelerator.device} | precision: {config.train.mixed_precision}"
        )
    return Run(config, accelerator, logger, checkpoints, resume_from, run_dir)


# --- data ---------------------------------------------------------------------------------------------


def train_dataset(data) -> ImageFolder:
    if not data.train:
        raise IllmError("data.train is empty: give a folder of training images (data.train=/path/to/images)")
    return ImageFolder(data.train, train_transform(data.crop_size, data.crop_mode))


def val_dataset(data) -> ImageFolder | None:
    if not data.val:
        return None
    dataset = ImageFolder(data.val, val_transform(data.val_crop_size))
    if data.val_max_images and len(dataset) > data.val_max_images:
        dataset = torch.utils.data.Subset(dataset, range(data.val_max_images))
    return dataset


def fixed_images(dataset, count: int, crop_size: int) -> torch.Tensor | None:
    """The first `count` readable images of a dataset under the validation transform (for grids)."""
    if dataset is None or count == 0:
        return None
    root = dataset.dataset.root if isinstance(dataset, torch.utils.data.Subset) else dataset.root
    plain = ImageFolder(root, val_transform(crop_size))
    images = [img for i in range(min(len(plain), count * 2)) if (img := plain[i]) is not None][:count]
    return torch.stack(images) if images else None


def fixed_image_sets(cfg, train_set, val_set) -> dict[str, Tensor | None]:
    """The fixed training and validation images every stage shows in its TensorBoard grids."""
    count, size = cfg.logging.num_images, cfg.data.val_crop_size
    return {"train": fixed_images(train_set, count, size), "val": fixed_images(val_set, count, size)}


class BatchStream:
    """Endless batches over epochs that remembers its position, so a resumed run sees the same data.

    The shuffle order is a function of (seed, epoch); on resume the first `batches_done`
    batches of the current epoch are skipped without being loaded.
    """

    def __init__(self, loader, accelerator: Accelerator):
        self.loader = loader
        self.accelerator = accelerator
        self.epoch = 0
        self.batches_done = 0
        self.skipped_images = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "skipped_images": self.skipped_images}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]
        self.skipped_images = state.get("skipped_images", 0)

    def __iter__(self):
        previous = None
        while True:
            self.loader.set_epoch(self.epoch)
            batches = self.loader
            if self.batches_done:
                batches = self.accelerator.skip_first_batches(self.loader, self.batches_done)
            for batch in batches:
                self.batches_done += 1
                self.skipped_images += batch.num_skipped
                if batch.images.shape[0] == 0:
                    # Every image of this batch was unreadable: repeat the last batch rather than
                    # skip the step, so all processes keep stepping together under DDP.
                    if previous is None:
                        continue
                    yield previous
                    continue
                previous = batch.images
                yield batch.images
            self.epoch += 1
            self.batches_done = 0


def accumulation_steps(data, num_processes: int) -> int:
    """Micro-batches per optimizer step that make `data.global_batch_size` on `num_processes`."""
    per_pass = data.batch_size * num_processes
    if data.global_batch_size == 0:
        return 1
    if data.global_batch_size % per_pass:
        per_process = data.global_batch_size / num_processes
        hint = (
            f"choose a data.batch_size that divides {int(per_process)}"
            if per_process.is_integer()
            else f"it is not divisible by {num_processes} processes"
        )
        raise ConfigError(
            f"key 'data.global_batch_size': {data.global_batch_size} images per step cannot be made of "
            f"micro-batches of data.batch_size={data.batch_size} on {num_processes} processes; {hint}"
        )
    return data.global_batch_size // per_pass


def micro_batches(batches, count: int) -> list[Tensor]:
    """The next `count` batches of the stream: the micro-batches of one optimizer step."""
    return [next(batches) for _ in range(count)]


def loaders(run: Run, train_set, val_set):
    """Prepared (per-process sharded) train and validation loaders."""
    data = run.config.data
    train_loader = make_loader(
        train_set,
        data.batch_size,
        shuffle=True,
        num_workers=data.num_workers,
        seed=run.config.run.seed,
        drop_last=True,
    )
    val_loader = None
    if val_set is not None:
        val_loader = make_loader(
            val_set, data.val_batch_size, shuffle=False, num_workers=data.num_workers, seed=0, drop_last=False
        )
    train_loader = run.accelerator.prepare_data_loader(train_loader)
    if val_loader is not None:
        val_loader = run.accelerator.prepare_data_loader(val_loader)
    return train_loader, val_loader


# --- distributed helpers ----------------------------------------------------------------------------


def ignore_in_ddp(model: nn.Module, params) -> None:
    """Keep `params` (e.g. compressai's quantiles) out of DDP's gradient sync.

    They never reach the main loss, so DDP would wait for their gradients forever; their
    own (auxiliary) gradients are averaged by `average_gradients` instead.
    """
    ids = {id(p) for p in params}
    names = [name for name, p in model.named_parameters() if id(p) in ids]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


def average_gradients(accelerator: Accelerator, params) -> None:
    if accelerator.num_processes == 1:
        return
    for p in params:
        if p.grad is not None:
            p.grad.copy_(accelerator.reduce(p.grad, reduction="mean"))


def sync_context(accelerator: Accelerator, model: nn.Module, last_micro_batch: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulated step."""
    return nullcontext() if last_micro_batch else accelerator.no_sync(model)


def quantile_step(accelerator: Accelerator, autoencoder: nn.Module, optimizer) -> Tensor:
    """One update of the entropy bottleneck's quantiles by their own (auxiliary) loss, which never
    reaches the main loss; their gradients are averaged over processes by hand (they are kept out
    of DDP: `ignore_in_ddp`). Returns the loss."""
    loss = autoencoder.aux_loss()
    loss.backward()
    average_gradients(accelerator, autoencoder.aux_parameters())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def clip_gradients(accelerator: Accelerator, params, max_norm: float) -> Tensor:
    """Clip the total gradient norm of `params` to `max_norm` (0 = no clipping) and return the norm
    before clipping, measured after any fp16 loss scale has been removed."""
    return accelerator.clip_grad_norm_(list(params), max_norm or math.inf)


@contextmanager
def evaluating(*models: nn.Module):
    """Eval mode for the block, then each model back to the mode it had."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# --- checkpoints ------------------------------------------------------------------------------------


def save_checkpoint(
    run: Run,
    step: int,
    models: dict,
    optimizers: dict,
    schedulers: dict,
    stream: BatchStream,
    metrics: dict | None = None,
) -> None:
    """Gather RNG states of every process; the main process writes the checkpoint."""
    accelerator = run.accelerator
    rng_states = [rng_state()]
    if accelerator.num_processes > 1:
        # Sent as torch.save bytes: all_gather_object cannot carry tensors in this torch version.
        buffer = io.BytesIO()
        torch.save(rng_states[0], buffer)
        gathered = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(gathered, buffer.getvalue())
        rng_states = [torch.load(io.BytesIO(data), weights_only=True) for data in gathered]
    if accelerator.is_main_process:
        checkpoint = {
            "stage": type(run.config).__name__,
            "step": step,
            "models": {name: accelerator.unwrap_model(m).state_dict() for name, m in models.items()},
            "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
            "schedulers": {name: s.state_dict() for name, s in schedulers.items()},
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "rng": rng_states,
            "data": stream.state_dict(),
            "metrics": {k: float(v) for k, v in (metrics or {}).items()},
            "config": config_io.to_toml(run.config),
        }
        run.checkpoints.save(checkpoint)
    accelerator.wait_for_everyone()


def load_checkpoint(run: Run, models: dict, optimizers: dict, schedulers: dict, stream: BatchStream) -> int:
    """Restore everything `save_checkpoint` wrote; returns the step to continue after."""
    checkpoint = read_checkpoint(run.resume_from)
    for name, model in models.items():
        run.accelerator.unwrap_model(model).load_state_dict(checkpoint["models"][name])
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(checkpoint["optimizers"][name])
    for name, scheduler in schedulers.items():
        scheduler.load_state_dict(checkpoint["schedulers"][name])
    if checkpoint.get("scaler") and run.accelerator.scaler is not None:
        run.accelerator.scaler.load_state_dict(checkpoint["scaler"])
    stream.load_state_dict(checkpoint["data"])
    states = checkpoint["rng"]
    set_rng_state(states[run.accelerator.process_index % len(states)])
    return checkpoint["step"]


# --- progress ---------------------------------------------------------------------------------------


@dataclass
class Progress:
    """tqdm bar on the main process plus throughput bookkeeping."""

    accelerator: Accelerator
    start_step: int
    max_steps: int
    images_per_step: int
    bar: tqdm | None = None
    last_time: float = field(default_factory=time.perf_counter)
    last_step: int = 0

    def __post_init__(self):
        self.last_step = self.start_step
        if self.accelerator.is_main_process:
            self.bar = tqdm(
                total=self.max_steps,
                initial=self.start_step,
                unit="step",
                dynamic_ncols=True,
                file=sys.stdout,
            )

    def rates(self, step: int) -> dict[str, float]:
        """Images per second (all processes) and seconds per step since the last call."""
        now = time.perf_counter()
        steps = max(1, step - self.last_step)
        seconds = (now - self.last_time) / steps
        self.last_time, self.last_step = now, step
        return {
            "perf/images_per_second": self.images_per_step / seconds if seconds > 0 else math.nan,
            "perf/step_seconds": seconds,
        }

    def update(self, step: int, **shown) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(
                {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in shown.items()}, refresh=False
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def is_due(step: int, every: int, max_steps: int) -> bool:
    return step % every == 0 or step == max_steps


@dataclass
class Housekeeping:
    """What every loop does between iterations, on one cadence: resume, logs, progress,
    validation and checkpoints. The loops keep only their data and their iteration function."""

    run: Run
    stream: BatchStream
    models: dict
    optimizers: dict
    schedulers: dict
    images_per_step: int
    progress: Progress | None = None
    val_metrics: dict = field(default_factory=dict)

    def start(self) -> int:
        """Restore the checkpoint being resumed, if any; returns the step to continue after."""
        run = self.run
        step = (
            load_checkpoint(run, self.models, self.optimizers, self.schedulers, self.stream)
            if run.resume_from
            else 0
        )
        self.progress = Progress(run.accelerator, step, run.config.train.max_steps, self.images_per_step)
        return step

    def after_iteration(self, step: int, logs, validate=None, **shown) -> None:
        """`logs()` gives the iteration's scalars (built only when due); `validate()` runs
        validation and returns its metrics (kept for the checkpoint's best-model choice)."""
        cfg, run = self.run.config, self.run
        max_steps = cfg.train.max_steps
        if is_due(step, cfg.logging.every, max_steps):
            common = {
                "perf/memory_gb": memory_gb(run.accelerator.device),
                "data/skipped_images": self.stream.skipped_images,
                **self.progress.rates(step),
            }
            run.logger.scalars({**logs(), **common}, step)
        self.progress.update(step, **{k: float(torch.as_tensor(v).detach()) for k, v in shown.items()})
        if validate is not None and is_due(step, cfg.logging.val_every, max_steps):
            self.val_metrics = validate()
        if is_due(step, cfg.checkpoint.every, max_steps):
            save_checkpoint(
                run, step, self.models, self.optimizers, self.schedulers, self.stream, self.val_metrics
            )
            self.val_metrics = {}


def finish_run(run: Run, progress: Progress, stage: str, step: int) -> None:
    """Close the progress bar and the event files, release the processes, say where the run is."""
    progress.close()
    run.logger.close()
    run.accelerator.end_training()
    if run.accelerator.is_main_process:
        print(f"[{stage}] done at step {step}: {run.run_dir}")
