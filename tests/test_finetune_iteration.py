"""Stage 2's iteration on tiny parts: the official order's pieces that a CPU can check quickly.

The golden tests (`test_golden_training.py`) compare whole iterations with the official ones;
these check what they cannot: several micro-batches, the precision of the labels, the latent-only
forward that gives the real images their context, and what is computed only when a log is due.
"""

import copy

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from helpers.models import TINY_AUTOENCODER
from helpers.paths import TINY_CONFIGS
from illm.config import load_config
from illm.experiment import FinetuneConfig, VQVAEConfig
from illm.losses import build_distortion
from illm.models.hific import HiFiCAutoencoder
from illm.stages.finetune import (
    PatchTargets,
    build_discriminator,
    build_parts,
    finetune_iteration,
    freeze_autoencoder,
    freeze_labeller,
    latent_channels,
    num_classes,
    split_batch,
)
from illm.stages.vqvae import build_vqvae

TINY = TINY_CONFIGS / "finetune.toml"


def tiny_labeller(seed: int = 0):
    torch.manual_seed(seed)
    cfg = load_config(VQVAEConfig, TINY_CONFIGS / "vqvae.toml", [])
    return freeze_labeller(build_vqvae(cfg.model))


def tiny_parts(*overrides: str):
    AcceleratorState._reset_state()
    cfg = load_config(
        FinetuneConfig, TINY, ["train.channels_last=false", "train.fused_optimizer=false", *overrides]
    )
    torch.manual_seed(0)
    model = freeze_autoencoder(HiFiCAutoencoder(**TINY_AUTOENCODER), cfg.freeze)
    labeller = tiny_labeller()
    discriminator = build_discriminator(cfg.discriminator, num_classes(labeller), latent_channels(model))
    distortion = build_distortion(cfg.distortion, None)
    targets = PatchTargets(labeller, discriminator.output_factor)
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    return cfg, build_parts(cfg, accelerator, model, discriminator, distortion, targets)


def images(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_labels_are_float32_under_bf16_autocast():
    labeller = tiny_labeller()
    targets = PatchTargets(labeller, labeller.downsampling_factor)
    batch = images(4, seed=1)
    expected = targets(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = targets(batch)
        assert labeller.encoder(batch).dtype == torch.bfloat16  # autocast is really in force here
    assert torch.equal(under_autocast, expected)


@pytest.mark.parametrize("frozen", [True, False])
def test_latent_only_forward_matches_the_full_forward(frozen):
    """`decode=False`: the same latent and the same random draws as a full forward, frozen (eval
    entropy models: no draws) or trainable (noise drawn as in training)."""
    torch.manual_seed(0)
    model = HiFiCAutoencoder(**TINY_AUTOENCODER).train()
    if frozen:
        model.freeze_encoder()
        model.freeze_bottleneck()
    batch = images(2, seed=2)
    torch.manual_seed(5)
    full = model(batch)
    state_after_full = torch.get_rng_state()
    torch.manual_seed(5)
    latent_only = model(batch, decode=False)
    assert latent_only.images is None
    assert torch.equal(latent_only.latent, full.latent)
    assert torch.equal(torch.get_rng_state(), state_after_full)


def test_logs_are_means_over_the_micro_batches():
    """Frozen encoder and entropy models (no quantization noise): the generator pass's losses of
    each micro-batch can be recomputed beforehand; the logged value is their mean."""
    cfg, parts = tiny_parts("freeze.encoder=true", "freeze.bottleneck=true")
    batches = [images(4, seed=3), images(4, seed=4)]
    model = copy.deepcopy(parts.autoencoder)
    expected = []
    with torch.no_grad():
        for batch in batches:
            model_images, _ = split_batch(batch, cfg.gan.mc_sampling)
            distortion, _ = parts.distortion(model(model_images).images, model_images)
            expected.append(distortion)
    result = finetune_iteration(parts, batches, step=0, log_due=True)
    assert torch.allclose(result.logs["train/distortion_loss"], torch.stack(expected).mean(), rtol=1e-6)
    assert not torch.allclose(expected[0], expected[1])  # two different values were averaged


def test_quality_metrics_only_when_a_log_is_due():
    _, parts = tiny_parts()
    quiet = finetune_iteration(parts, [images(4, seed=5)], step=0, log_due=False)
    assert "train/mse" not in quiet.logs and "train/psnr" not in quiet.logs
    logged = finetune_iteration(parts, [images(4, seed=6)], step=1, log_due=True)
    assert "train/mse" in logged.logs and "train/psnr" not in logged.logs  # PSNR is pooled at log time


def test_unfrozen_parts_train_everything_and_step_the_quantiles():
    cfg, parts = tiny_parts("freeze.encoder=false", "freeze.bottleneck=false")
    assert parts.aux_optimizer is not None
    before = {name: p.detach().clone() for name, p in parts.autoencoder.named_parameters()}
    result = finetune_iteration(parts, [images(4, seed=7)], step=0, log_due=False)
    after = dict(parts.autoencoder.named_parameters())
    for prefix in (
        "encoder.",
        "hyper_analysis.",
        "hyper_synthesis_mean.",
        "decoder.",
        "hyper_bottleneck.quantiles",
    ):
        changed = [n for n in before if n.startswith(prefix) and not torch.equal(before[n], after[n])]
        assert changed, f"nothing of {prefix} was updated"
    assert isinstance(result.logs["train/quantile_loss"], torch.Tensor)


def test_without_mc_sampling_the_whole_batch_is_both_fake_and_real():
    _, parts = tiny_parts("gan.mc_sampling=false")
    batch = images(2, seed=8)
    result = finetune_iteration(parts, [batch], step=0, log_due=False)
    tensors = result.discriminator
    assert result.images.shape[0] == 2 and tensors.real_targets is tensors.generator_targets
    assert tensors.real_logits.shape == tensors.fake_logits.shape
