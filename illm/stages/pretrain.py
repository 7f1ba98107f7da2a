"""Stage 1: train the HiFiC autoencoder for rate and distortion.

    accelerate launch scripts/pretrain.py configs/0.14bpp.toml data.train=DIR data.val=DIR

Per iteration: forward, distortion, rate (HiFiC rate targeting), backward, clip, model
optimizer and LR-schedule step; then the auxiliary quantile loss and its optimizer.
"""

from __future__ import annotations

import torch

from illm import metrics
from illm.config import load_config
from illm.errors import MissingWeightsError
from illm.experiment import PretrainConfig
from illm.losses import Distortion, rate_loss, scheduled
from illm.models.hific import HiFiCAutoencoder
from illm.optimizer import adamw, lr_schedule
from illm.training import (
    BatchStream,
    Progress,
    average_gradients,
    evaluating,
    finish_run,
    fixed_images,
    gradient_norm,
    ignore_in_ddp,
    load_checkpoint,
    loaders,
    memory_gb,
    parse_args,
    run_main,
    save_checkpoint,
    start_run,
    sync_context,
    train_dataset,
    val_dataset,
)

USAGE = "usage: accelerate launch scripts/pretrain.py CONFIG.toml [section.key=value ...]"


def build_autoencoder(model_cfg) -> HiFiCAutoencoder:
    return HiFiCAutoencoder(
        latent_channels=model_cfg.latent_channels,
        hyper_channels=model_cfg.hyper_channels,
        encoder_channels=tuple(model_cfg.encoder_channels),
        num_residual_blocks=model_cfg.num_residual_blocks,
    )


def build_lpips(lpips_cfg, needed: bool):
    """The LPIPS network, or None; stops at start when pretrained weights are unavailable."""
    if not needed:
        return None
    try:
        return metrics.lpips_network(lpips_cfg.net, random_backbone=lpips_cfg.backbone_weights == "random")
    except MissingWeightsError as error:
        raise MissingWeightsError(f"{error} (or set lpips.backbone_weights=\"random\" for a run whose LPIPS is not comparable)") from None


def build_distortion(cfg, lpips) -> Distortion:
    return Distortion(cfg.distortion.kind, cfg.distortion.mse_weight, cfg.distortion.lpips_weight, lpips)


def rate_schedule(rate_cfg, step: int) -> tuple[float, float]:
    """The target bpp and λ_b in force at `step` (the early phase is looser on both)."""
    target = scheduled(rate_cfg.target_bpp, rate_cfg.warmup_target_factor, rate_cfg.warmup_steps, step)
    lam_above = scheduled(rate_cfg.lam_above, rate_cfg.warmup_lam_factor, rate_cfg.warmup_steps, step)
    return target, lam_above


def validate(run, model, val_loader, distortion: Distortion, lpips, rate_cfg, step: int, fixed: dict) -> dict[str, float]:
    """Eval-mode (rounded) metrics over the validation set, averaged over all processes."""
    accelerator = run.accelerator
    unwrapped = accelerator.unwrap_model(model)
    target, lam_above = rate_schedule(rate_cfg, step)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    with evaluating(unwrapped):
        for batch in val_loader:
            images = batch.images
            if images.shape[0] == 0:
                continue
            with accelerator.autocast():
                out = unwrapped(images)
            recon = out.images.float().clamp(0, 1)
            dist, terms = distortion(recon, images)
            rate = rate_loss(out.likelihoods, out.rounded_likelihoods, images.shape[-2] * images.shape[-1], target, rate_cfg.lam_below, lam_above)
            per_image = {
                "val/psnr": metrics.psnr(recon, images),
                "val/bpp": rate.rounded_bpp,
                "val/latent_bpp": rate.rounded_latent_bpp,
                "val/hyper_bpp": rate.rounded_hyper_bpp,
            }
            if min(images.shape[-2:]) >= metrics.MS_SSIM_MIN_SIDE:
                per_image["val/ms_ssim"] = metrics.ms_ssim(recon, images)
            if lpips is not None:
                per_image["val/lpips"] = lpips(recon, images).flatten()
            batch_terms = {"val/distortion_loss": dist, "val/rate_loss": rate.loss, **{f"val/{k}": v for k, v in terms.items()}}
            per_image.update({name: value.detach().expand(images.shape[0]) for name, value in batch_terms.items()})
            for name, values in per_image.items():
                # gather_for_metrics drops the samples Accelerate repeats to even out the shards
                values = accelerator.gather_for_metrics(values.detach().float().contiguous())
                sums[name] = sums.get(name, 0) + values.sum()
                counts[name] = counts.get(name, 0) + values.numel()
        results = {name: (sums[name] / counts[name]).item() for name in sums}
        for split, images in fixed.items():
            if images is not None:
                recon = unwrapped(images.to(accelerator.device)).images
                run.logger.image_pairs(f"{split}/input_vs_reconstruction", images, recon, step)
    run.logger.scalars(results, step)
    return results


def main(argv: list[str]) -> None:
    config_path, overrides = parse_args(argv, USAGE)
    train(load_config(PretrainConfig, config_path, overrides))


def train(cfg: PretrainConfig) -> HiFiCAutoencoder:
    """Run (or resume) stage 1 as `cfg` says; returns the trained autoencoder (unwrapped)."""
    train_set, val_set = train_dataset(cfg.data), val_dataset(cfg.data)  # fail on bad folders first
    lpips = build_lpips(cfg.lpips, needed=cfg.distortion.kind == "mse_lpips" or bool(cfg.data.val))
    run = start_run(cfg, "pretrain")
    accelerator = run.accelerator

    model = build_autoencoder(cfg.model)
    ignore_in_ddp(model, model.aux_parameters())
    optimizer = adamw(model.main_parameters(), cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas)
    aux_optimizer = adamw(model.aux_parameters(), cfg.optim.aux_lr)
    scheduler = lr_schedule(optimizer, cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.decay_steps)
    distortion = build_distortion(cfg, lpips).to(accelerator.device)
    lpips = lpips.to(accelerator.device) if lpips is not None else None
    train_loader, val_loader = loaders(run, train_set, val_set)
    # The quantile optimizer stays unprepared: its loss is never scaled by an fp16 GradScaler.
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    stream = BatchStream(train_loader, accelerator)
    fixed = {"train": fixed_images(train_set, cfg.logging.num_images, cfg.data.val_crop_size), "val": fixed_images(val_set, cfg.logging.num_images, cfg.data.val_crop_size)}

    models, optimizers, schedulers = {"autoencoder": model}, {"model": optimizer, "aux": aux_optimizer}, {"model": scheduler}
    step = load_checkpoint(run, models, optimizers, schedulers, stream) if run.resume_from else 0
    progress = Progress(accelerator, step, cfg.train.max_steps, cfg.data.batch_size * cfg.train.grad_accum_steps * accelerator.num_processes)
    batches = iter(stream)
    model.train()
    val_metrics: dict[str, float] = {}
    while step < cfg.train.max_steps:
        target, lam_above = rate_schedule(cfg.rate, step)
        # --- autoencoder step (gradient accumulation over micro-batches) ---
        for micro in range(cfg.train.grad_accum_steps):
            images = next(batches)
            last = micro == cfg.train.grad_accum_steps - 1
            with sync_context(accelerator, model, last), accelerator.autocast():
                out = model(images)
                dist, terms = distortion(out.images, images)
                rate = rate_loss(out.likelihoods, out.rounded_likelihoods, images.shape[-2] * images.shape[-1], target, cfg.rate.lam_below, lam_above)
                loss = cfg.distortion.lam * dist + rate.loss
                accelerator.backward(loss / cfg.train.grad_accum_steps)
        grad_norm = gradient_norm(unwrapped.main_parameters())
        if cfg.train.grad_clip > 0:
            accelerator.clip_grad_norm_(list(unwrapped.main_parameters()), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # --- quantile (auxiliary) step: never part of the main loss ---
        aux_loss = unwrapped.aux_loss()
        aux_loss.backward()
        average_gradients(accelerator, unwrapped.aux_parameters())
        aux_optimizer.step()
        aux_optimizer.zero_grad(set_to_none=True)
        step += 1

        # --- logs, validation, checkpoints ---
        if step % cfg.logging.every == 0 or step == cfg.train.max_steps:
            logs = {
                "train/loss": loss, "train/distortion_loss": dist, "train/rate_loss": rate.loss, "train/aux_loss": aux_loss,
                **{f"train/{k}": v for k, v in terms.items()},
                "train/bpp": rate.bpp, "train/latent_bpp": rate.latent_bpp, "train/hyper_bpp": rate.hyper_bpp,
                "train/rounded_bpp": rate.rounded_bpp, "train/rounded_latent_bpp": rate.rounded_latent_bpp, "train/rounded_hyper_bpp": rate.rounded_hyper_bpp,
                "rate/target_bpp": target, "rate/lam_above": lam_above,
                "optim/lr": scheduler.get_last_lr()[0], "optim/aux_lr": aux_optimizer.param_groups[0]["lr"], "optim/grad_norm": grad_norm,
                "perf/memory_gb": memory_gb(accelerator.device), "data/skipped_images": stream.skipped_images,
                **progress.rates(step),
            }
            run.logger.scalars(logs, step)
        progress.update(step, loss=loss.item(), bpp=rate.rounded_bpp.mean().item())
        if val_loader is not None and (step % cfg.logging.val_every == 0 or step == cfg.train.max_steps):
            val_metrics = validate(run, model, val_loader, distortion, lpips, cfg.rate, step, fixed)
            model.train()
        if step % cfg.checkpoint.every == 0 or step == cfg.train.max_steps:
            save_checkpoint(run, step, models, optimizers, schedulers, stream, val_metrics)
            val_metrics = {}
    finish_run(run, progress, "pretrain", step)
    return unwrapped


def cli(argv=None) -> None:
    run_main(main, argv)
