"""The training loop's cadence and what it reports: when to log and validate, the logged scalars
of an iteration (averaged over its micro-batches and every process, only when a log is due),
throughput, memory and the progress bar."""

from __future__ import annotations

import math
import resource
import sys
import time

import torch
from torch import Tensor
from tqdm import tqdm

from illm.errors import ConfigError
from illm.faults import describe_write_error, share_write_failure
from illm.step_metrics import reduce_logs


def is_due(step: int, every: int, max_steps: int) -> bool:
    return step % every == 0 or step == max_steps


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


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class Progress:
    """tqdm bar on the main process, refreshed at the logging cadence, and throughput bookkeeping."""

    def __init__(self, accelerator, start_step: int, max_steps: int, images_per_step: int):
        self.images_per_step = images_per_step
        self.last_time, self.last_step = time.perf_counter(), start_step
        self.bar = None
        if accelerator.is_main_process:
            self.bar = tqdm(
                total=max_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stdout
            )

    def rates(self, step: int) -> dict[str, float]:
        """Images per second (all processes) and seconds per step since the last call."""
        now = time.perf_counter()
        seconds = (now - self.last_time) / max(1, step - self.last_step)
        self.last_time, self.last_step = now, step
        return {
            "perf/images_per_second": self.images_per_step / seconds if seconds > 0 else math.nan,
            "perf/step_seconds": seconds,
        }

    def update(self, step: int, shown: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class TrainingLog:
    """When the loop logs and validates, and what a training log holds.

    `shown` maps progress-bar labels to logged names. Validation runs every `logging.val_every`
    iterations and, when `checkpoint.best_metric` is set, at every checkpoint too: a `best.pt`
    candidate is judged only by a validation at its own step.
    """

    def __init__(self, run, data, start_step: int, shown: dict[str, str]):
        self.run, self.data, self.shown = run, data, shown
        self.cfg = run.config
        self.progress = Progress(run.accelerator, start_step, self.cfg.train.max_steps, data.images_per_step)

    def due(self, step: int) -> bool:
        return is_due(step, self.cfg.logging.every, self.cfg.train.max_steps)

    def validation_due(self, step: int) -> bool:
        by_cadence = is_due(step, self.cfg.logging.val_every, self.cfg.train.max_steps)
        return by_cadence or bool(self.cfg.checkpoint.best_metric and self.run.checkpoints.due(step))

    def write(self, step: int, logs: dict[str, Tensor | float]) -> dict[str, float]:
        """Log the iteration's scalars (reduced over processes), throughput, memory and the data
        counters; refresh the progress bar. Returns the logged training scalars."""
        values = reduce_logs(self.run.accelerator, logs)
        common = {
            "perf/memory_gb": memory_gb(self.run.accelerator.device),
            "data/skipped_images": self.data.stream.skipped_images,
            **self.progress.rates(step),
        }
        failure = ""
        try:  # written now, so that a full disk stops the run here and not in a writer thread
            self.run.logger.scalars({**values, **common}, step)
            self.run.logger.flush()
        except OSError as error:
            failure = f"could not write the TensorBoard events of {self.run.run_dir} ({describe_write_error(error)})"
        share_write_failure(self.run.accelerator, failure)
        self.progress.update(
            step, {label: values[name] for label, name in self.shown.items() if name in values}
        )
        return values

    def close(self) -> None:
        self.progress.close()
