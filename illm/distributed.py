"""What DDP needs from the iteration functions: parameters it must not sync, the hand-made
average of those, and no all-reduce on the micro-batches before the last one."""

from __future__ import annotations

from contextlib import nullcontext

from torch import nn


def ignore_in_ddp(model: nn.Module, params) -> None:
    """Keep `params` (e.g. compressai's quantiles) out of DDP's gradient sync.

    They never reach the main loss, so DDP would wait for their gradients forever; their
    own (auxiliary) gradients are averaged by `average_gradients` instead.
    """
    ids = {id(p) for p in params}
    names = [name for name, p in model.named_parameters() if id(p) in ids]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


def average_gradients(accelerator, params) -> None:
    if accelerator.num_processes == 1:
        return
    for p in params:
        if p.grad is not None:
            p.grad.copy_(accelerator.reduce(p.grad, reduction="mean"))


def sync_context(accelerator, model: nn.Module, last_micro_batch: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulated step."""
    return nullcontext() if last_micro_batch else accelerator.no_sync(model)
