"""Stage 2: MS-ILLM — fine-tune the generator against a conditional U-Net discriminator.

    accelerate launch scripts/finetune_gan.py configs/finetune_0.14bpp.toml data.train=DIR data.val=DIR

The autoencoder starts from stage 1 (`init.autoencoder`) with its encoder and entropy models
frozen; the frozen VQ-VAE (`init.labeller`) labels every 8x8 patch of the real images. Per
iteration, as released:

1. Monte-Carlo sampling splits the batch in halves: the first is compressed, the second
   gives the discriminator its real images (context: their latent, computed without grad).
2. Generator step: distortion + rate + `gan.generator_weight` * CE(D(x_hat, latent), labels(x) + 1),
   back-propagated through a discriminator whose parameters are frozen for the step.
3. Discriminator step: 0.5 * [CE(D(x_real, ctx), labels(x_real) + 1) + CE(D(x_hat), 0)] on the
   detached reconstructions of step 2.

Two DDP models train here. The generator step calls the *unwrapped* discriminator with its
parameters' requires_grad off, so none of its DDP hooks fire; frozen autoencoder parts have
requires_grad off before `accelerator.prepare`, so DDP never expects their gradients.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from illm import zoo
from illm.config import load_config
from illm.errors import ConfigError, IllmError
from illm.experiment import FinetuneConfig
from illm.losses import discriminator_loss, generator_loss, rate_loss
from illm.models.discriminator import ConditionalUNetDiscriminator
from illm.models.hific import HiFiCAutoencoder
from illm.models.vqvae import VQVAE
from illm.optimizer import adamw
from illm.stages.pretrain import build_distortion, build_lpips, rate_schedule, validate
from illm.sweep import run_with_sweeps
from illm.training import (
    BatchStream,
    Progress,
    average_gradients,
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

USAGE = (
    "usage: accelerate launch scripts/finetune_gan.py CONFIG.toml [section.key=value ...]\n"
    "       [--sweep section.key=v1,v2,... ...] [--sweep-index N]"
)


# --- models -------------------------------------------------------------------------------------------


def load_network(source: str, kind: str, key: str, device="cpu") -> nn.Module:
    """`zoo.load`, with the config key that named the source in its error message."""
    try:
        return zoo.load(source, kind=kind, device=device)
    except IllmError as error:
        raise type(error)(f"{key}: {error}") from None


def load_autoencoder(source: str, key: str, freeze_cfg, device) -> HiFiCAutoencoder:
    """The stage-1 autoencoder (architecture from its weights), frozen where `freeze` says."""
    model = load_network(source, "autoencoder", key, device)
    model.train()
    if freeze_cfg.encoder:
        model.freeze_encoder()
    if freeze_cfg.bottleneck:
        model.freeze_bottleneck()
    return model


def load_labeller(source: str) -> VQVAE:
    """The VQ-VAE whose codes are the real classes: frozen, in eval mode, never prepared."""
    labeller = load_network(source, "vqvae", "init.labeller")
    labeller.eval().requires_grad_(False)
    return labeller


def latent_channels(model: HiFiCAutoencoder) -> int:
    return model.encoder.blocks[-1].out_channels


def build_discriminator(disc_cfg, num_classes: int, context_channels: int) -> ConditionalUNetDiscriminator:
    return ConditionalUNetDiscriminator(
        num_classes=num_classes,
        context_in_channels=context_channels,
        context_out_channels=disc_cfg.context_channels,
        channels=(3 + disc_cfg.context_channels, *disc_cfg.channels),
        norm_type=disc_cfg.norm,
    )


def num_classes(labeller: VQVAE | None) -> int:
    """Discriminator outputs: "fake" plus one class per code, or plus "real" without a labeller."""
    return 2 if labeller is None else labeller.num_codes + 1


class PatchTargets:
    """The discriminator's class for every real patch of `factor` x `factor` pixels: its VQ-VAE
    code + 1 (`vq`), or 1 without a labeller (`binary`). Class 0 is "fake" in both cases."""

    def __init__(self, labeller: VQVAE | None, factor: int):
        if labeller is not None and labeller.downsampling_factor != factor:
            raise ConfigError(f"init.labeller labels {labeller.downsampling_factor}x{labeller.downsampling_factor} patches, the discriminator classifies {factor}x{factor} ones")
        self.labeller = labeller
        self.factor = factor

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        if self.labeller is None:
            batch, _, height, width = images.shape
            return torch.ones(batch, height // self.factor, width // self.factor, dtype=torch.long, device=images.device)
        return self.labeller.labels(images) + 1


@contextmanager
def frozen_parameters(module: nn.Module):
    """requires_grad off inside the block: the graph built there passes gradients to the
    module's inputs but records none for its parameters (so no DDP hook of theirs can fire)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def split_batch(images: Tensor, mc_sampling: bool) -> tuple[Tensor, Tensor]:
    """(images to compress, real images for the discriminator): halves, or the batch twice
    (also for a lone image, left when unreadable files were dropped from a batch)."""
    if not mc_sampling or images.shape[0] < 2:
        return images, images
    half = images.shape[0] // 2
    return images[:half], images[half : 2 * half]


def accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    return (logits.argmax(1) == targets).float().mean()


# --- the loop -------------------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    config_path, overrides = parse_args(argv, USAGE)
    train(load_config(FinetuneConfig, config_path, overrides))


def train(cfg: FinetuneConfig) -> nn.ModuleDict:
    """Run (or resume) stage 2 as `cfg` says; returns the trained (unwrapped) networks as
    `{"autoencoder": ..., "discriminator": ...}`."""
    train_set, val_set = train_dataset(cfg.data), val_dataset(cfg.data)  # fail on bad folders first
    lpips = build_lpips(cfg.lpips, needed=cfg.distortion.kind == "mse_lpips" or bool(cfg.data.val))
    labeller = load_labeller(cfg.init.labeller) if cfg.discriminator.target == "vq" else None
    run = start_run(cfg, "finetune")
    accelerator = run.accelerator
    device = accelerator.device

    # A resumed run rebuilds the autoencoder from its own checkpoint, whatever became of init.autoencoder.
    if run.resume_from:
        model = load_autoencoder(str(run.resume_from), "resumed checkpoint", cfg.freeze, device)
    else:
        model = load_autoencoder(cfg.init.autoencoder, "init.autoencoder", cfg.freeze, device)
    labeller = labeller.to(device) if labeller is not None else None
    discriminator = build_discriminator(cfg.discriminator, num_classes(labeller), latent_channels(model)).to(device)
    targets = PatchTargets(labeller, discriminator.output_factor)

    optimizer = adamw(model.main_parameters(), cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas)
    disc_optimizer = adamw(discriminator.parameters(), cfg.optim.disc_lr, cfg.optim.disc_weight_decay, cfg.optim.disc_betas)
    aux_optimizer = None
    if not cfg.freeze.bottleneck:  # the quantiles only move when the entropy bottleneck trains
        ignore_in_ddp(model, model.aux_parameters())
        aux_optimizer = adamw(model.aux_parameters(), cfg.optim.aux_lr)
    distortion = build_distortion(cfg, lpips).to(device)
    lpips = lpips.to(device) if lpips is not None else None
    train_loader, val_loader = loaders(run, train_set, val_set)
    # The quantile optimizer stays unprepared, as in stage 1.
    model, discriminator, optimizer, disc_optimizer = accelerator.prepare(model, discriminator, optimizer, disc_optimizer)
    unwrapped, unwrapped_disc = accelerator.unwrap_model(model), accelerator.unwrap_model(discriminator)
    generator_params = [p for p in unwrapped.main_parameters() if p.requires_grad]
    stream = BatchStream(train_loader, accelerator)
    fixed = {"train": fixed_images(train_set, cfg.logging.num_images, cfg.data.val_crop_size), "val": fixed_images(val_set, cfg.logging.num_images, cfg.data.val_crop_size)}

    models = {"autoencoder": model, "discriminator": discriminator}
    optimizers = {"generator": optimizer, "discriminator": disc_optimizer}
    if aux_optimizer is not None:
        optimizers["aux"] = aux_optimizer
    step = load_checkpoint(run, models, optimizers, {}, stream) if run.resume_from else 0
    images_per_step = cfg.data.batch_size * cfg.train.grad_accum_steps * accelerator.num_processes
    progress = Progress(accelerator, step, cfg.train.max_steps, images_per_step)
    batches = iter(stream)
    model.train()
    discriminator.train()
    accum = cfg.train.grad_accum_steps
    val_metrics: dict[str, float] = {}
    while step < cfg.train.max_steps:
        target, lam_above = rate_schedule(cfg.rate, step)
        # Both updates come after all micro-batches: the discriminator step only sees detached
        # reconstructions, so this equals the released generator-then-discriminator order.
        for micro in range(accum):
            last = micro == accum - 1
            images = next(batches)
            model_images, real_images = split_batch(images, cfg.gan.mc_sampling)
            split = real_images is not model_images
            with accelerator.autocast():
                generator_targets = targets(model_images)
                real_targets = targets(real_images) if split else generator_targets

            # --- generator step: the discriminator only passes gradients through ---
            with sync_context(accelerator, model, last), accelerator.autocast():
                out = model(model_images)
                dist, terms = distortion(out.images, model_images)
                rate = rate_loss(out.likelihoods, out.rounded_likelihoods, model_images.shape[-2] * model_images.shape[-1], target, cfg.rate.lam_below, lam_above)
                with frozen_parameters(unwrapped_disc):
                    adversarial = generator_loss(unwrapped_disc(out.images, out.latent.detach()), generator_targets)
                loss = cfg.distortion.lam * dist + rate.loss + cfg.gan.generator_weight * adversarial
                accelerator.backward(loss / accum)

            # --- discriminator step: fakes are class 0, real patches their label ---
            real_context = out.latent
            if split:
                with torch.no_grad(), accelerator.autocast():
                    real_context = unwrapped(real_images).latent
            with sync_context(accelerator, discriminator, last), accelerator.autocast():
                fake_logits = discriminator(out.images.detach(), out.latent.detach())
                real_logits = discriminator(real_images, real_context.detach())
                disc_loss = discriminator_loss(real_logits, fake_logits, real_targets)
                accelerator.backward(disc_loss / accum)

        grad_norm = gradient_norm(generator_params)
        disc_grad_norm = gradient_norm(unwrapped_disc.parameters())
        if cfg.train.grad_clip > 0:
            accelerator.clip_grad_norm_(generator_params, cfg.train.grad_clip)
            accelerator.clip_grad_norm_(list(unwrapped_disc.parameters()), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        disc_optimizer.step()
        disc_optimizer.zero_grad(set_to_none=True)
        aux_loss = None
        if aux_optimizer is not None:
            aux_loss = unwrapped.aux_loss()
            aux_loss.backward()
            average_gradients(accelerator, unwrapped.aux_parameters())
            aux_optimizer.step()
            aux_optimizer.zero_grad(set_to_none=True)
        step += 1

        # --- logs, validation, checkpoints ---
        if step % cfg.logging.every == 0 or step == cfg.train.max_steps:
            logs = {
                "train/loss": loss, "train/generator_loss": adversarial, "train/discriminator_loss": disc_loss,
                "train/distortion_loss": dist, "train/rate_loss": rate.loss, **{f"train/{k}": v for k, v in terms.items()},
                "disc/real_accuracy": accuracy(real_logits, real_targets), "disc/fake_accuracy": accuracy(fake_logits, torch.zeros_like(generator_targets)),
                "train/bpp": rate.bpp, "train/latent_bpp": rate.latent_bpp, "train/hyper_bpp": rate.hyper_bpp,
                "train/rounded_bpp": rate.rounded_bpp, "train/rounded_latent_bpp": rate.rounded_latent_bpp, "train/rounded_hyper_bpp": rate.rounded_hyper_bpp,
                "rate/target_bpp": target, "rate/lam_above": lam_above,
                "optim/lr": optimizer.param_groups[0]["lr"], "optim/disc_lr": disc_optimizer.param_groups[0]["lr"],
                "optim/grad_norm": grad_norm, "optim/disc_grad_norm": disc_grad_norm,
                "perf/memory_gb": memory_gb(device), "data/skipped_images": stream.skipped_images,
                **progress.rates(step),
            }
            if aux_loss is not None:
                logs["train/aux_loss"] = aux_loss
            run.logger.scalars(logs, step)
        progress.update(step, g=adversarial.item(), d=disc_loss.item(), bpp=rate.rounded_bpp.mean().item())
        if val_loader is not None and (step % cfg.logging.val_every == 0 or step == cfg.train.max_steps):
            val_metrics = validate(run, model, val_loader, distortion, lpips, cfg.rate, step, fixed)
            model.train()
        if step % cfg.checkpoint.every == 0 or step == cfg.train.max_steps:
            save_checkpoint(run, step, models, optimizers, {}, stream, val_metrics)
            val_metrics = {}
    finish_run(run, progress, "finetune", step)
    return nn.ModuleDict({"autoencoder": unwrapped, "discriminator": unwrapped_disc})


def cli(argv=None) -> None:
    """`scripts/finetune_gan.py`: one run, or one per value of each `--sweep`."""
    run_main(lambda args: run_with_sweeps(main, FinetuneConfig, args, USAGE), argv)
