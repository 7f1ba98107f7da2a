"""Optimizers and learning-rate schedules, chosen by name from the config.

Every schedule is a factor of the base learning rate, stepped once per training iteration:

- `ramp_quarter_cosine` is the official `RampCosineLRSchedule` (neuralcompression/optim/
  _ramp_cosine.py): `max(step / warmup, 1e-12)` during the warm-up, then
  `max(cos((step - warmup) / decay_steps * pi / 2), 1e-12)`, a quarter cosine that would reach 0
  at `warmup + decay_steps`. The official stage-1 runs end at 1M iterations, where it is 0.016.
- `ramp_half_cosine` is linear warm-up from `1 / warmup` to 1, then a half cosine from 1 down to
  exactly 0 at `decay_steps` (our stage-0 recipe; no official one exists).
- `constant` is the official `IdentitySchedule`.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from illm.distributed import average_gradients

# The official schedule never lets the factor reach 0.
OFFICIAL_MIN_FACTOR = 1e-12


def adamw(
    params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), fused: bool = False
) -> torch.optim.AdamW:
    """AdamW over the trainable `params` (torch's defaults otherwise, as the official optimizers);
    `fused` selects torch's single-kernel implementation (CPU and CUDA)."""
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(
        params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), fused=fused or None
    )


def ramp_quarter_cosine(step: int, warmup_steps: int, decay_steps: int) -> float:
    """The official factor: linear ramp from 0, then a quarter cosine over `decay_steps`."""
    if step < warmup_steps:
        return max(min(step / warmup_steps, 1.0), OFFICIAL_MIN_FACTOR)
    angle = (step - warmup_steps) / decay_steps * math.pi / 2
    return max(math.cos(angle), OFFICIAL_MIN_FACTOR)


def ramp_half_cosine(step: int, warmup_steps: int, decay_steps: int) -> float:
    """Linear warm-up to 1 over `warmup_steps`, then a half cosine from 1 to 0 at `decay_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def constant(step: int, warmup_steps: int, decay_steps: int) -> float:
    return 1.0


LR_SCHEDULES = {
    "ramp_quarter_cosine": ramp_quarter_cosine,
    "ramp_half_cosine": ramp_half_cosine,
    "constant": constant,
}


def lr_schedule(optimizer, name: str, warmup_steps: int = 0, decay_steps: int = 1) -> LambdaLR:
    """The schedule `name` (a key of `LR_SCHEDULES`), stepped once per iteration."""
    factor = LR_SCHEDULES[name]
    return LambdaLR(optimizer, lambda step: factor(step, warmup_steps, decay_steps))


def quantile_step(accelerator, autoencoder, optimizer) -> torch.Tensor:
    """One update of the entropy bottleneck's quantiles by their own (auxiliary) loss, which never
    reaches the main loss; their gradients are averaged over processes by hand (they are kept out
    of DDP: `ignore_in_ddp`). Returns the loss."""
    loss = autoencoder.aux_loss()
    loss.backward()
    average_gradients(accelerator, autoencoder.aux_parameters())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def clip_gradients(accelerator, params, max_norm: float) -> torch.Tensor:
    """Clip the total gradient norm of `params` to `max_norm` (0 = no clipping) and return the norm
    before clipping, measured after any fp16 loss scale has been removed."""
    return accelerator.clip_grad_norm_(list(params), max_norm or math.inf)
