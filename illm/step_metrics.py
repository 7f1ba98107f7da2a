"""The logged training scalars of one iteration, over all its micro-batches and processes.

An iteration's `logs` (`illm.iteration.IterationResult.logs`) are this process's means over its
micro-batches, on the device. On an iteration that logs, `reduce_logs` averages them over the
processes with one collective and one host transfer, and derives the pooled PSNR.
"""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from torch import Tensor

PIXEL_MAX = 255.0  # the official PSNR's data range (8-bit images)


def pooled_psnr(mse_255: float) -> float:
    """PSNR of a mean squared error on the 0-255 scale: 10 log10(255² / MSE), as torchmetrics
    computes it from the squared error pooled over every pixel of every image."""
    if mse_255 <= 0:
        return math.inf
    return 10.0 * math.log10(PIXEL_MAX**2 / mse_255)


def as_float64(value: Tensor | float, device: torch.device) -> Tensor:
    """A scalar as a float64 tensor on `device`; a Python number without a float32 detour."""
    if isinstance(value, Tensor):
        return value.detach().to(device, torch.float64).reshape(())
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def reduce_logs(accelerator: Accelerator, logs: dict[str, Tensor | float]) -> dict[str, float]:
    """Means over the processes of every value of `logs` (one all-reduce of all of them stacked in
    one float64 tensor), as floats; `train/psnr` is derived from the pooled `train/mse`.

    Every process must call it at the same iteration with the same keys (a collective).
    """
    names = list(logs)
    if not names:
        return {}
    values = torch.stack([as_float64(logs[name], accelerator.device) for name in names])
    means = accelerator.reduce(values, reduction="mean").tolist()
    reduced = dict(zip(names, means))
    if "train/mse" in reduced:
        reduced["train/psnr"] = pooled_psnr(reduced["train/mse"])
    return reduced
