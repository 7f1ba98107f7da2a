"""Channels-last training under DDP: every gradient has its parameter's layout, so DDP copies no
gradient into its buckets through a stride change and does not warn "Grad strides do not match
bucket view strides" (issue 18, DDP gradient buckets)."""

import pytest
import torch

from helpers.launch import launch_two_processes
from helpers.paths import REPO, TINY_CONFIGS
from helpers.synthetic import synthetic_images
from illm.config import load_config
from illm.experiment import FinetuneConfig
from illm.models.hific import HiFiCAutoencoder
from illm.models.layers import ChannelNorm2d
from illm.stages.finetune import build_discriminator


def layout_mismatches(module: torch.nn.Module) -> list[str]:
    return [
        name
        for name, parameter in module.named_parameters()
        if parameter.grad is not None and parameter.grad.stride() != parameter.stride()
    ]


def test_channels_last_gradients_have_their_parameters_layout():
    torch.manual_seed(0)
    autoencoder = HiFiCAutoencoder(16, 16, (16, 24, 32, 48, 64), 2).train()
    autoencoder = autoencoder.to(memory_format=torch.channels_last)
    config = load_config(FinetuneConfig, TINY_CONFIGS / "finetune.toml", [])
    discriminator = build_discriminator(config.discriminator, 16, 16).train()
    discriminator = discriminator.to(memory_format=torch.channels_last)
    images = torch.rand(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    output = autoencoder(images)
    logits = discriminator(images, output.latent.contiguous(memory_format=torch.channels_last))
    (output.images.square().mean() + logits.square().mean() + autoencoder.aux_loss()).backward()
    assert layout_mismatches(autoencoder) == [] and layout_mismatches(discriminator) == []
    norm = autoencoder.encoder.blocks[0][1]
    assert isinstance(norm, ChannelNorm2d) and norm.gamma.stride() == (16, 1, 1, 1)
    assert autoencoder.encoder.blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
def test_two_process_channels_last_training_has_no_bucket_layout_warning(tmp_path):
    synthetic_images(tmp_path / "train", 4, (80, 96), seed=0)
    overrides = [
        f"run.dir={tmp_path / 'run'}",
        f"data.train={tmp_path / 'train'}",
        "data.val=",
        "train.max_steps=2",
        "train.channels_last=true",
        "data.batch_size=2",
        "checkpoint.every=2",
    ]
    script = REPO / "tests" / "helpers" / "ddp_warnings.py"
    out = launch_two_processes(
        script, "pretrain", str(tmp_path), str(TINY_CONFIGS / "pretrain.toml"), *overrides
    )
    assert out.count("grad stride warnings: 0") == 2, out
