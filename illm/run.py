"""A training run's setup: Accelerate and its process group, seeds, the run folder, the resolved
config, the checkpoint manager, the resume and TensorBoard."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    set_seed,
)

from illm import backends
from illm import config as config_io
from illm.checkpoint import CheckpointManager, TrainingState, prepare_run_dir, read_checkpoint, resume_point
from illm.divergence import refuse_repeated_divergence
from illm.errors import RunStopped
from illm.faults import describe_write_error, share_write_failure
from illm.files import atomic_write_bytes
from illm.logger import TensorBoardLogger
from illm.preemption import StopRequest


@dataclass
class Run:
    """The run-wide objects a training loop needs. `logger` exists once `resume` has run."""

    config: object
    stage: str
    accelerator: Accelerator
    checkpoints: CheckpointManager
    resume_from: Path | None
    run_dir: Path
    config_toml: str
    stop: StopRequest
    logger: TensorBoardLogger | None = None


def start_run(config, stage: str, broadcast_buffers: bool = True) -> Run:
    """Accelerator, seeds, run-folder check (resume / refuse / overwrite) and the saved config.

    `broadcast_buffers=False` stops DDP from copying the main process's buffers to the others
    before every forward (stage 0 keeps per-process codebook hit counters and sums them itself).
    """
    # One process may run several experiments (the demo's stages, a --sweep-index run, tests), each
    # with its own precision; Accelerate keeps the first one's unless its shared state is reset
    # (the process group stays). No public API resets it, hence the private call.
    AcceleratorState._reset_state()
    collective_timeout = timedelta(seconds=config.run.collective_timeout_s)
    accelerator = Accelerator(
        mixed_precision=config.train.mixed_precision,
        # Pinned batches copied asynchronously: the copy overlaps the previous step's kernels.
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=broadcast_buffers),
            InitProcessGroupKwargs(timeout=collective_timeout),
        ],
    )
    # Training crops have one fixed size, so cuDNN's per-shape algorithm search pays off.
    torch.backends.cudnn.benchmark = accelerator.device.type == "cuda"
    set_seed(config.run.seed + accelerator.process_index)
    backends.allow_tf32_convolutions(config.train.allow_tf32)
    run_dir = Path(config.run.dir)
    config_toml = config_io.to_toml(config)
    resuming = prepare_run_dir(
        run_dir, config_toml, config.run.resume, config.run.overwrite, move=accelerator.is_main_process
    )
    accelerator.wait_for_everyone()
    checkpoints = CheckpointManager(
        run_dir, config.checkpoint, accelerator, config.train.max_steps, config_toml
    )
    resume_from = (
        resume_point(run_dir, config.run.resume_from) if resuming or config.run.resume_from else None
    )
    refuse_repeated_divergence(run_dir, config, resume_from)
    failure = ""
    if accelerator.is_main_process:
        checkpoints.remove_stale_temporaries()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(run_dir / "config.toml", config_toml.encode())
        except OSError as error:
            failure = f"could not write {run_dir / 'config.toml'} ({describe_write_error(error)})"
        where = f"resuming from {resume_from}" if resume_from else "new run"
        print(
            f"[{stage}] {where}: {run_dir} | processes: {accelerator.num_processes} | device: "
            f"{accelerator.device} | precision: {config.train.mixed_precision}"
        )
    share_write_failure(accelerator, failure)
    return Run(
        config,
        stage,
        accelerator,
        checkpoints,
        resume_from,
        run_dir,
        config_toml,
        StopRequest(accelerator, collective_timeout),
    )


def resume(run: Run, state: TrainingState) -> int:
    """Restore the checkpoint the run continues from, if any, and open TensorBoard there (events
    logged after that checkpoint by an interrupted run are purged, so curves never double back).
    Returns the number of iterations done."""
    step = 0
    if run.resume_from:
        step = run.checkpoints.restore(read_checkpoint(run.resume_from), state)
    run.logger = TensorBoardLogger(
        run.run_dir, enabled=run.accelerator.is_main_process, purge_step=step + 1 if step else None
    )
    run.logger.text("config", "```toml\n" + run.config_toml + "\n```", step)
    return step


def stop_after_checkpoint(run: Run, step: int) -> None:
    """Leave the run after the checkpoint that a stop signal asked for."""
    run.stop.close()
    run.logger.close()
    raise RunStopped(
        f"{run.stop.signal_name} at iteration {step}: wrote {run.checkpoints.path_for(step)}; "
        "run the same command to continue from it"
    )


def finish_run(run: Run, step: int) -> None:
    """Close the event files, release the processes, say where the run is."""
    run.stop.close()
    run.logger.close()
    run.accelerator.end_training()
    if run.accelerator.is_main_process:
        print(f"[{run.stage}] done at step {step}: {run.run_dir}")
