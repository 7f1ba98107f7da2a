"""Stage 1: train the HiFiC autoencoder for rate and distortion.

    accelerate launch scripts/pretrain.py configs/0.14bpp.toml data.train=DIR data.val=DIR

One iteration (`pretrain_iteration`, the official `TargetRateCompressionModule.training_step`):
forward, distortion, rate (HiFiC rate targeting), backward, clip, model optimizer and LR-schedule
step; then the auxiliary quantile loss and its optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from illm.config import load_config
from illm.experiment import PretrainConfig
from illm.iteration import IterationResult, MicroBatchMeans, ScheduleValues, quality_logs
from illm.losses import Distortion, build_distortion, build_lpips, rate_loss, rate_schedule
from illm.models.hific import HiFiCAutoencoder
from illm.optimizer import adamw, lr_schedule
from illm.step_metrics import reduce_logs
from illm.training import (
    BatchStream,
    Housekeeping,
    accumulation_steps,
    clip_gradients,
    finish_run,
    fixed_image_sets,
    ignore_in_ddp,
    is_due,
    loaders,
    micro_batches,
    parse_args,
    quantile_step,
    run_main,
    start_run,
    sync_context,
    train_dataset,
    val_dataset,
)
from illm.validation import validate_autoencoder

USAGE = "usage: accelerate launch scripts/pretrain.py CONFIG.toml [section.key=value ...]"


def build_autoencoder(model_cfg) -> HiFiCAutoencoder:
    return HiFiCAutoencoder(
        latent_channels=model_cfg.latent_channels,
        hyper_channels=model_cfg.hyper_channels,
        encoder_channels=tuple(model_cfg.encoder_channels),
        num_residual_blocks=model_cfg.num_residual_blocks,
    )


@dataclass
class PretrainParts:
    """What one stage-1 iteration works on. `model` may be wrapped by `accelerator.prepare`."""

    cfg: PretrainConfig
    accelerator: Accelerator
    model: nn.Module
    optimizer: object
    scheduler: object
    aux_optimizer: object
    distortion: Distortion


def build_parts(
    cfg: PretrainConfig, accelerator: Accelerator, model: HiFiCAutoencoder, distortion: Distortion
) -> PretrainParts:
    """The optimizers and LR schedule of `cfg` around `model`, prepared for `accelerator`.

    The quantile optimizer stays unprepared (its loss is never scaled by an fp16 GradScaler) and
    the quantiles stay out of DDP's gradient sync (`average_gradients` handles them).
    """
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ignore_in_ddp(model, model.aux_parameters())
    fused = cfg.train.fused_optimizer
    optimizer = adamw(model.main_parameters(), cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, fused)
    aux_optimizer = adamw(model.aux_parameters(), cfg.optim.aux_lr, cfg.optim.aux_weight_decay, fused=fused)
    scheduler = lr_schedule(optimizer, cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.decay_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    return PretrainParts(cfg, accelerator, model, optimizer, scheduler, aux_optimizer, distortion)


def pretrain_iteration(
    parts: PretrainParts, batches: list[Tensor], step: int, log_due: bool = True
) -> IterationResult:
    """One training iteration on the micro-batches `batches` (gradients accumulated over them),
    `step` iterations having been done before it. Its logs are means over the micro-batches;
    the quality metrics (MSE, MS-SSIM) are computed only when `log_due`."""
    cfg, accelerator, model = parts.cfg, parts.accelerator, parts.model
    unwrapped = accelerator.unwrap_model(model)
    target, lam_above = rate_schedule(cfg.rate, step)
    lr = parts.optimizer.param_groups[0]["lr"]  # the schedule steps within the iteration
    logs = MicroBatchMeans(len(batches))
    # --- autoencoder update ---
    for index, images in enumerate(batches):
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with sync_context(accelerator, model, index == len(batches) - 1), accelerator.autocast():
            out = model(images)
            distortion, terms = parts.distortion(out.images, images)
            num_pixels = images.shape[-2] * images.shape[-1]
            rate = rate_loss(
                out.likelihoods, out.rounded_likelihoods, num_pixels, target, cfg.rate.lam_below, lam_above
            )
            loss = cfg.distortion.lam * distortion + rate.loss
        accelerator.backward(loss / len(batches))
        logs.add(
            {
                "train/total_loss": loss,
                "train/distortion_loss": distortion,
                "train/rate_loss": rate.loss,
                **{f"train/distortion_{name}": value for name, value in terms.items()},
                **rate.logs(target, lam_above),
                **(quality_logs(out.images, images) if log_due else {}),
            }
        )
    grad_norm = clip_gradients(accelerator, unwrapped.main_parameters(), cfg.train.grad_clip)
    parts.optimizer.step()
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    aux_loss = quantile_step(accelerator, unwrapped, parts.aux_optimizer)
    once = {
        "train/quantile_loss": aux_loss,
        "optim/lr": lr,
        "optim/aux_lr": parts.aux_optimizer.param_groups[0]["lr"],
        "optim/grad_norm": grad_norm,
    }
    return IterationResult(
        logs={**logs.means(), **once},
        forward=out,
        images=images,
        rate=rate,
        schedule=ScheduleValues(target, lam_above),
    )


def main(argv: list[str]) -> None:
    config_path, overrides = parse_args(argv, USAGE)
    train(load_config(PretrainConfig, config_path, overrides))


def train(cfg: PretrainConfig) -> HiFiCAutoencoder:
    """Run (or resume) stage 1 as `cfg` says; returns the trained autoencoder (unwrapped)."""
    train_set, val_set = train_dataset(cfg.data), val_dataset(cfg.data)  # fail on bad folders first
    lpips = build_lpips(cfg.lpips, needed=cfg.distortion.kind == "mse_lpips" or bool(cfg.data.val))
    run = start_run(cfg, "pretrain")
    accelerator = run.accelerator
    accumulation = accumulation_steps(cfg.data, accelerator.num_processes)

    distortion = build_distortion(cfg.distortion, lpips).to(accelerator.device)
    lpips = lpips.to(accelerator.device) if lpips is not None else None
    parts = build_parts(cfg, accelerator, build_autoencoder(cfg.model), distortion)
    model, optimizer, scheduler, aux_optimizer = (
        parts.model,
        parts.optimizer,
        parts.scheduler,
        parts.aux_optimizer,
    )
    train_loader, val_loader = loaders(run, train_set, val_set)
    stream = BatchStream(train_loader, accelerator)
    fixed = fixed_image_sets(cfg, train_set, val_set)

    housekeeping = Housekeeping(
        run,
        stream,
        models={"autoencoder": model},
        optimizers={"model": optimizer, "aux": aux_optimizer},
        schedulers={"model": scheduler},
        images_per_step=cfg.data.batch_size * accumulation * accelerator.num_processes,
    )
    step = housekeeping.start()

    def validate():
        return validate_autoencoder(run, model, val_loader, distortion, lpips, cfg.rate, step, fixed)

    batches = iter(stream)
    model.train()
    while step < cfg.train.max_steps:
        log_due = is_due(step + 1, cfg.logging.every, cfg.train.max_steps)
        result = pretrain_iteration(parts, micro_batches(batches, accumulation), step, log_due)
        step += 1
        housekeeping.after_iteration(
            step,
            logs=partial(reduce_logs, accelerator, result.logs),
            validate=validate if val_loader is not None else None,
            loss=result.logs["train/total_loss"],
            bpp=result.logs["train/quantized_total_bpp"],
        )
    finish_run(run, housekeeping.progress, "pretrain", step)
    return accelerator.unwrap_model(model)


def cli(argv=None) -> None:
    run_main(main, argv)
