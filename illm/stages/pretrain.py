"""Stage 1: train the HiFiC autoencoder for rate and distortion.

    accelerate launch scripts/pretrain.py configs/0.14bpp.toml data.train=DIR data.val=DIR

One iteration (`pretrain_iteration`, the official `TargetRateCompressionModule.training_step`):
forward, distortion, rate (HiFiC rate targeting), backward, clip, model optimizer and LR-schedule
step; then the auxiliary quantile loss and its optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from illm.checkpoint import TrainingState
from illm.config import load_config
from illm.data import TrainingData
from illm.distributed import ignore_in_ddp, sync_context
from illm.divergence import check_finite
from illm.entry import parse_args
from illm.experiment import PretrainConfig
from illm.faults import lost_peers
from illm.iteration import IterationResult, MicroBatchMeans, ScheduleValues, quality_logs
from illm.loop import TrainingLog
from illm.losses import Distortion, autoencoder_losses, build_lpips, rate_loss, rate_schedule
from illm.models.hific import HiFiCAutoencoder
from illm.optimizer import adamw, clip_gradients, lr_schedule, quantile_step
from illm.run import finish_run, resume, start_run, stop_after_checkpoint
from illm.sweep import USAGE_LINE, stage_cli
from illm.validation import AutoencoderValidation, build_fid

USAGE = "usage: accelerate launch scripts/pretrain.py CONFIG.toml [section.key=value ...]\n" + USAGE_LINE


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
    aux_optimizer = adamw(model.aux_parameters(), cfg.quantiles.lr, cfg.quantiles.weight_decay, fused=fused)
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
    config_path, overrides = parse_args(argv, USAGE, PretrainConfig)
    cfg = load_config(PretrainConfig, config_path, overrides)
    with lost_peers(cfg.run.dir):
        train(cfg)


def train(cfg: PretrainConfig) -> HiFiCAutoencoder:
    """Run (or resume) stage 1 as `cfg` says; returns the trained autoencoder (unwrapped)."""
    data = TrainingData(cfg)  # bad folders are refused before any process starts
    lpips = build_lpips(cfg.lpips, needed=cfg.distortion.kind == "mse_lpips" or data.val_set is not None)
    fid = build_fid(cfg.fid, needed=data.val_set is not None)
    run = start_run(cfg, "pretrain")
    data.prepare(run.accelerator)
    distortion, lpips = autoencoder_losses(cfg.distortion, lpips, run.accelerator.device)
    fid = fid.to(run.accelerator.device) if fid is not None else None
    parts = build_parts(cfg, run.accelerator, build_autoencoder(cfg.model), distortion)
    validate = AutoencoderValidation(run, data.val_loader, distortion, lpips, cfg.rate, data.fixed, fid)
    state = TrainingState(
        models={"autoencoder": parts.model},
        optimizers={"model": parts.optimizer, "aux": parts.aux_optimizer},
        schedulers={"model": parts.scheduler},
        stream=data.stream,
        learning_rates={"model": cfg.optim.lr},
    )
    step = resume(run, state)
    log = TrainingLog(run, data, step, shown={"loss": "train/total_loss", "bpp": "train/quantized_total_bpp"})
    parts.model.train()
    while step < cfg.train.max_steps:
        log_due = log.due(step + 1)
        result = pretrain_iteration(parts, data.next_micro_batches(), step, log_due)
        step += 1
        stopping = run.stop.requested()  # SIGTERM or SIGUSR1 on any process
        if log_due or run.checkpoints.due(step) or stopping:
            check_finite(run, step, result.logs, state.models)
        if log_due:
            log.write(step, result.logs)
        val_metrics = None
        if data.val_loader is not None and log.validation_due(step):
            val_metrics = validate(parts.model, step)
        if run.checkpoints.due(step) or stopping:
            run.checkpoints.save(step, state, val_metrics)
        if stopping:
            stop_after_checkpoint(run, step)
    log.close()
    finish_run(run, step)
    return run.accelerator.unwrap_model(parts.model)


def cli(argv=None) -> None:
    """`scripts/pretrain.py`: one run, or one per value of each `--sweep`."""
    stage_cli("pretrain.py", main, PretrainConfig, USAGE, argv)
