"""Optimizers and learning-rate schedules, chosen by name from the config."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def adamw(params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas))


def ramp_cosine(step: int, warmup_steps: int, decay_steps: int) -> float:
    """LR factor: linear warm-up from 0 to 1 over `warmup_steps`, cosine from 1 to 0 at `decay_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(optimizer, name: str, warmup_steps: int = 0, decay_steps: int = 1) -> LambdaLR:
    """The schedule `name` (`ramp_cosine` or `constant`), stepped once per iteration."""
    factors = {
        "ramp_cosine": lambda step: ramp_cosine(step, warmup_steps, decay_steps),
        "constant": lambda step: 1.0,
    }
    return LambdaLR(optimizer, factors[name])
