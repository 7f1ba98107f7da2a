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
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from illm import zoo
from illm.checkpoint import TrainingState
from illm.config import load_config
from illm.data import TrainingData
from illm.distributed import ignore_in_ddp, sync_context
from illm.divergence import check_finite
from illm.entry import parse_args
from illm.errors import ConfigError, IllmError
from illm.experiment import FinetuneConfig
from illm.faults import lost_peers
from illm.iteration import (
    DiscriminatorTensors,
    IterationResult,
    MicroBatchMeans,
    ScheduleValues,
    quality_logs,
)
from illm.loop import TrainingLog
from illm.losses import (
    Distortion,
    autoencoder_losses,
    build_lpips,
    discriminator_loss,
    generator_loss,
    rate_loss,
    rate_schedule,
)
from illm.models.discriminator import ConditionalUNetDiscriminator
from illm.models.hific import HiFiCAutoencoder
from illm.models.vqvae import VQVAE
from illm.optimizer import adamw, clip_gradients, quantile_step
from illm.run import finish_run, resume, start_run, stop_after_checkpoint
from illm.sweep import USAGE_LINE, stage_cli
from illm.validation import Adversarial, AutoencoderValidation, build_fid

USAGE = "usage: accelerate launch scripts/finetune_gan.py CONFIG.toml [section.key=value ...]\n" + USAGE_LINE


# --- models -------------------------------------------------------------------------------------------


def load_network(source: str, kind: str, key: str, device="cpu") -> nn.Module:
    """`zoo.load`, with the config key that named the source in its error message."""
    try:
        return zoo.load(source, kind=kind, device=device)
    except IllmError as error:
        raise type(error)(f"{key}: {error}") from None


def load_autoencoder(source: str, key: str, freeze_cfg, device) -> HiFiCAutoencoder:
    """The stage-1 autoencoder (architecture from its weights), frozen where `freeze` says."""
    return freeze_autoencoder(load_network(source, "autoencoder", key, device), freeze_cfg)


def freeze_autoencoder(model: HiFiCAutoencoder, freeze_cfg) -> HiFiCAutoencoder:
    """Train mode, with the parts `freeze` names frozen (eval mode, no gradients)."""
    model.train()
    if freeze_cfg.encoder:
        model.freeze_encoder()
    if freeze_cfg.bottleneck:
        model.freeze_bottleneck()
    return model


def load_labeller(source: str) -> VQVAE:
    """The VQ-VAE whose codes are the real classes: frozen, in eval mode, never prepared."""
    return freeze_labeller(load_network(source, "vqvae", "init.labeller"))


def freeze_labeller(labeller: VQVAE) -> VQVAE:
    return labeller.eval().requires_grad_(False)


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
            raise ConfigError(
                f"init.labeller labels {labeller.downsampling_factor}x{labeller.downsampling_factor} "
                f"patches, the discriminator classifies {factor}x{factor} ones"
            )
        self.labeller = labeller
        self.factor = factor

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """Targets of `images`, in float32 whatever autocast is in force: the labels are the VQ-VAE's
        nearest codes, which must not depend on the training precision."""
        if self.labeller is None:
            batch, _, height, width = images.shape
            return torch.ones(
                batch, height // self.factor, width // self.factor, dtype=torch.long, device=images.device
            )
        with torch.autocast(images.device.type, enabled=False):
            return self.labeller.labels(images.float()) + 1


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


# --- one iteration -------------------------------------------------------------------------------------


@dataclass
class FinetuneParts:
    """What one stage-2 iteration works on. `model` and `discriminator` may be wrapped by
    `accelerator.prepare`; `aux_optimizer` is None while the bottleneck is frozen (as released)."""

    cfg: FinetuneConfig
    accelerator: Accelerator
    model: nn.Module
    discriminator: nn.Module
    optimizer: object
    disc_optimizer: object
    aux_optimizer: object | None
    distortion: Distortion
    targets: PatchTargets

    @property
    def autoencoder(self) -> HiFiCAutoencoder:
        """The autoencoder without its DDP wrapper."""
        return self.accelerator.unwrap_model(self.model)

    def training_state(self, stream) -> TrainingState:
        """What a stage-2 checkpoint holds (the quantile optimizer only while it exists)."""
        optimizers = {"generator": self.optimizer, "discriminator": self.disc_optimizer}
        if self.aux_optimizer is not None:
            optimizers["aux"] = self.aux_optimizer
        return TrainingState(
            models={"autoencoder": self.model, "discriminator": self.discriminator},
            optimizers=optimizers,
            schedulers={},
            stream=stream,
            learning_rates={"generator": self.cfg.optim.lr, "discriminator": self.cfg.optim.disc_lr},
        )


def build_parts(
    cfg: FinetuneConfig,
    accelerator: Accelerator,
    model: HiFiCAutoencoder,
    discriminator: nn.Module,
    distortion: Distortion,
    targets: PatchTargets,
) -> FinetuneParts:
    """The optimizers of `cfg` around the (frozen where `freeze` says) autoencoder and the
    discriminator, prepared for `accelerator`. The quantile optimizer exists only with a
    trainable bottleneck, and stays unprepared as in stage 1."""
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
        discriminator = discriminator.to(memory_format=torch.channels_last)
    fused = cfg.train.fused_optimizer
    optim = cfg.optim
    optimizer = adamw(model.main_parameters(), optim.lr, optim.weight_decay, optim.betas, fused)
    disc_optimizer = adamw(
        discriminator.parameters(), optim.disc_lr, optim.disc_weight_decay, optim.disc_betas, fused
    )
    aux_optimizer = None
    if not cfg.freeze.bottleneck:  # the quantiles only move when the entropy bottleneck trains
        ignore_in_ddp(model, model.aux_parameters())
        aux_optimizer = adamw(
            model.aux_parameters(), cfg.quantiles.lr, cfg.quantiles.weight_decay, fused=fused
        )
    model, discriminator, optimizer, disc_optimizer = accelerator.prepare(
        model, discriminator, optimizer, disc_optimizer
    )
    return FinetuneParts(
        cfg, accelerator, model, discriminator, optimizer, disc_optimizer, aux_optimizer, distortion, targets
    )


def finetune_iteration(
    parts: FinetuneParts, batches: list[Tensor], step: int, log_due: bool = True
) -> IterationResult:
    """One training iteration (the official `GANCompressionModule.training_step`) on the
    micro-batches `batches`, each split into images to compress and real images as the official
    step splits its per-process batch; `step` iterations have been done before it.

    The official order, with gradients accumulated over the micro-batches at each step:
    labels; generator pass over all micro-batches, model step; discriminator pass over all
    micro-batches, whose real images get their context from the model *after* its step (a
    train-mode forward, which draws quantization noise where the entropy models train);
    discriminator step; quantile step. Logs are means over the micro-batches; the quality
    metrics are computed only when `log_due`.
    """
    cfg, accelerator = parts.cfg, parts.accelerator
    unwrapped_disc = accelerator.unwrap_model(parts.discriminator)
    target, lam_above = rate_schedule(cfg.rate, step)
    lr = parts.optimizer.param_groups[0]["lr"]
    halves = [split_batch(channels_last(images, cfg), cfg.gan.mc_sampling) for images in batches]
    labels = [label_halves(parts.targets, model_images, real_images) for model_images, real_images in halves]
    logs = MicroBatchMeans(len(batches))

    # --- generator: the discriminator only passes gradients through ---
    fakes = []
    for index, ((model_images, _), (generator_targets, _)) in enumerate(zip(halves, labels)):
        with sync_context(accelerator, parts.model, index == len(batches) - 1), accelerator.autocast():
            out = parts.model(model_images)
            distortion, terms = parts.distortion(out.images, model_images)
            num_pixels = model_images.shape[-2] * model_images.shape[-1]
            rate = rate_loss(
                out.likelihoods, out.rounded_likelihoods, num_pixels, target, cfg.rate.lam_below, lam_above
            )
            with frozen_parameters(unwrapped_disc):
                generator_logits = unwrapped_disc(out.images, out.latent.detach())
            adversarial = generator_loss(generator_logits, generator_targets)
            loss = cfg.distortion.lam * distortion + rate.loss + cfg.gan.generator_weight * adversarial
        accelerator.backward(loss / len(batches))
        fakes.append((out.images.detach(), out.latent.detach()))
        logs.add(
            {
                "train/total_model_loss": loss,
                "train/distortion_loss": distortion,
                "train/rate_loss": rate.loss,
                "train/generator_loss": adversarial,
                **{f"train/distortion_{name}": value for name, value in terms.items()},
                **rate.logs(target, lam_above),
                **(quality_logs(out.images, model_images) if log_due else {}),
            }
        )
    generator_params = [p for p in parts.autoencoder.main_parameters() if p.requires_grad]
    grad_norm = clip_gradients(accelerator, generator_params, cfg.train.grad_clip)
    parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)

    # --- discriminator: fakes are class 0, real patches their label ---
    for index, ((model_images, real_images), (_, real_targets), (fake_images, fake_latent)) in enumerate(
        zip(halves, labels, fakes)
    ):
        real_context = fake_latent if real_images is model_images else real_latent(parts, real_images)
        with (
            sync_context(accelerator, parts.discriminator, index == len(batches) - 1),
            accelerator.autocast(),
        ):
            fake_logits = parts.discriminator(fake_images, fake_latent)
            real_logits = parts.discriminator(real_images, real_context)
            disc_loss = discriminator_loss(real_logits, fake_logits, real_targets)
        accelerator.backward(disc_loss / len(batches))
        logs.add(
            {
                "train/discriminator_loss": disc_loss,
                "disc/real_accuracy": accuracy(real_logits, real_targets),
                "disc/fake_accuracy": accuracy(fake_logits, torch.zeros_like(real_targets)),
            }
        )
    disc_grad_norm = clip_gradients(accelerator, unwrapped_disc.parameters(), cfg.train.grad_clip)
    parts.disc_optimizer.step()
    parts.disc_optimizer.zero_grad(set_to_none=True)

    # --- quantiles, only while the entropy bottleneck trains (the official step logs 0.0 otherwise) ---
    aux_loss = 0.0
    if parts.aux_optimizer is not None:
        aux_loss = quantile_step(accelerator, parts.autoencoder, parts.aux_optimizer)

    once = {
        "train/quantile_loss": aux_loss,
        "optim/lr": lr,
        "optim/disc_lr": parts.disc_optimizer.param_groups[0]["lr"],
        "optim/grad_norm": grad_norm,
        "optim/disc_grad_norm": disc_grad_norm,
    }
    return IterationResult(
        logs={**logs.means(), **once},
        forward=out,
        images=halves[-1][0],
        rate=rate,
        schedule=ScheduleValues(target, lam_above),
        discriminator=DiscriminatorTensors(
            generator_targets=labels[-1][0],
            real_targets=labels[-1][1],
            generator_logits=generator_logits,
            fake_logits=fake_logits,
            real_logits=real_logits,
        ),
    )


def label_halves(targets: PatchTargets, model_images: Tensor, real_images: Tensor) -> tuple[Tensor, Tensor]:
    """(targets of the images to compress, targets of the real images); one labelling when
    Monte-Carlo sampling is off and both are the same images."""
    model_targets = targets(model_images)
    return model_targets, model_targets if real_images is model_images else targets(real_images)


def channels_last(images: Tensor, cfg: FinetuneConfig) -> Tensor:
    return images.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last else images


@torch.no_grad()
def real_latent(parts: FinetuneParts, real_images: Tensor) -> Tensor:
    """The real images' context: the generator input the model (after its step) gives them, from a
    train-mode forward as in the official step. The generator itself is not run: it does not
    touch the latent and draws no random numbers."""
    with parts.accelerator.autocast():
        return parts.autoencoder(real_images, decode=False).latent


# --- the loop -------------------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    config_path, overrides = parse_args(argv, USAGE, FinetuneConfig)
    cfg = load_config(FinetuneConfig, config_path, overrides)
    with lost_peers(cfg.run.dir):
        train(cfg)


def train(cfg: FinetuneConfig) -> nn.ModuleDict:
    """Run (or resume) stage 2 as `cfg` says; returns the trained (unwrapped) networks as
    `{"autoencoder": ..., "discriminator": ...}`."""
    data = TrainingData(cfg)  # bad folders and weights are refused before any process starts
    lpips = build_lpips(cfg.lpips, needed=cfg.distortion.kind == "mse_lpips" or data.val_set is not None)
    fid = build_fid(cfg.fid, needed=data.val_set is not None)
    labeller = load_labeller(cfg.init.labeller) if cfg.discriminator.target == "vq" else None
    run = start_run(cfg, "finetune")
    data.prepare(run.accelerator)
    distortion, lpips = autoencoder_losses(cfg.distortion, lpips, run.accelerator.device)
    fid = fid.to(run.accelerator.device) if fid is not None else None
    parts = build_finetune(cfg, run, labeller, distortion)
    adversarial = Adversarial(parts.discriminator, parts.targets, cfg.gan.generator_weight)
    validate = AutoencoderValidation(
        run, data.val_loader, distortion, lpips, cfg.rate, data.fixed, fid, adversarial
    )
    state = parts.training_state(data.stream)
    step = resume(run, state)
    shown = {"g": "train/generator_loss", "d": "train/discriminator_loss", "bpp": "train/quantized_total_bpp"}
    log = TrainingLog(run, data, step, shown)
    while step < cfg.train.max_steps:
        log_due = log.due(step + 1)
        result = finetune_iteration(parts, data.next_micro_batches(), step, log_due)
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
    unwrap = run.accelerator.unwrap_model
    return nn.ModuleDict({"autoencoder": unwrap(parts.model), "discriminator": unwrap(parts.discriminator)})


def build_finetune(cfg: FinetuneConfig, run, labeller, distortion: Distortion) -> FinetuneParts:
    """The stage-2 networks on the run's device, in train mode, with their optimizers. A resumed
    run rebuilds the autoencoder from its own checkpoint, whatever became of init.autoencoder."""
    device = run.accelerator.device
    if run.resume_from:
        model = load_autoencoder(str(run.resume_from), "resumed checkpoint", cfg.freeze, device)
    else:
        model = load_autoencoder(cfg.init.autoencoder, "init.autoencoder", cfg.freeze, device)
    labeller = labeller.to(device) if labeller is not None else None
    discriminator = build_discriminator(cfg.discriminator, num_classes(labeller), latent_channels(model))
    targets = PatchTargets(labeller, discriminator.output_factor)
    parts = build_parts(cfg, run.accelerator, model, discriminator.to(device), distortion, targets)
    parts.model.train()
    parts.discriminator.train()
    return parts


def cli(argv=None) -> None:
    """`scripts/finetune_gan.py`: one run, or one per value of each `--sweep`."""
    stage_cli("finetune_gan.py", main, FinetuneConfig, USAGE, argv)
