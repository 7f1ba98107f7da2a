"""Behaviour of the VQ-VAE labeller on a tiny model."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers.models import TINY_VQVAE
from illm.errors import ConfigError, IllmError
from illm.models.vqvae import VQVAE


@pytest.fixture
def model():
    torch.manual_seed(0)
    return VQVAE(**TINY_VQVAE)


@pytest.fixture
def images():
    return torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))


def test_forward_shapes(model, images):
    output = model(images)
    assert output.images.shape == images.shape
    assert output.indices.shape == (2, 4, 6) and output.indices.dtype == torch.int64
    assert output.latent.shape == (2, 4, 4, 6)
    assert torch.allclose(output.latent.norm(dim=1), torch.ones(2, 4, 6), atol=1e-5)


def test_forward_pads_odd_sizes_and_crops_back(model, images):
    output = model.eval()(images[:, :, :30, :45])
    assert output.images.shape == (2, 3, 30, 45)
    assert output.indices.shape == (2, 4, 6)


def test_indices_are_nearest_normalised_codes(model, images):
    output = model(images)
    codebook = F.normalize(model.quantizer.codebook.detach(), dim=1)
    vectors = output.latent.detach().permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
    brute_force = ((vectors[:, None] - codebook[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(output.indices.flatten(), brute_force)


def test_losses_are_distance_to_chosen_codes(model, images):
    output = model(images)
    codebook = F.normalize(model.quantizer.codebook.detach(), dim=1)
    chosen = codebook[output.indices].permute(0, 3, 1, 2)
    expected = ((output.latent.detach() - chosen) ** 2).mean()
    assert torch.isfinite(output.commitment_loss) and torch.isfinite(output.codebook_loss)
    assert torch.allclose(output.commitment_loss, expected)
    assert torch.allclose(output.codebook_loss, expected)


def test_straight_through_gradient(model):
    z = F.normalize(torch.randn(1, 4, 3, 5), dim=1).requires_grad_()
    quantized, indices, _, _ = model.quantizer(z)
    codebook = F.normalize(model.quantizer.codebook.detach(), dim=1)
    assert torch.allclose(quantized, codebook[indices].permute(0, 3, 1, 2))
    weights = torch.randn_like(z)
    (quantized * weights).sum().backward()
    assert torch.equal(z.grad, weights)  # identity gradient through the quantiser


def test_backward_reaches_every_part(model, images):
    output = model(images)
    loss = F.mse_loss(output.images, images) + output.commitment_loss + output.codebook_loss
    loss.backward()
    for name in (
        "encoder.conv_in.weight",
        "bottleneck_op.input_conv.weight",
        "bottleneck_op.child.child.codebooks.0",
        "decoder.conv_out.weight",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_forward_under_bf16_autocast(model, images):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(images)
    assert output.commitment_loss.dtype == torch.float32
    assert output.indices.dtype == torch.int64
    assert torch.isfinite(output.images.float()).all()


def test_labels(model, images):
    labels = model.labels(images)
    assert labels.shape == (2, 4, 6) and labels.dtype == torch.int64
    assert labels.min() >= 0 and labels.max() < model.num_codes
    assert not labels.requires_grad
    assert torch.equal(labels, model.eval()(images).indices)


def test_labels_reject_sizes_not_divisible_by_factor(model, images):
    with pytest.raises(IllmError, match="divisible by 8"):
        model.labels(images[:, :, :30])
    with pytest.raises(IllmError, match="B x 3 x H x W"):
        model.labels(images[0])


def test_hits_are_counted_in_training_forward_only(model, images):
    model.train()
    output = model(images)
    hits = model.quantizer.codebook_hits_0
    assert torch.equal(hits, torch.bincount(output.indices.flatten(), minlength=32))
    model.labels(images)
    model.eval()(images)
    assert hits.sum() == output.indices.numel()
    model.reset_codebook_hits()
    assert hits.sum() == 0


def test_codebook_usage_over_indices(model):
    indices = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3]])
    usage = model.codebook_usage(indices)
    assert usage["perplexity"] == pytest.approx(4.0)
    assert usage["used_fraction"] == pytest.approx(4 / 32)
    assert usage["dead_codes"] == 28
    assert usage["max_hits"] == 2
    dead = model.dead_codes(indices)
    assert dead.sum() == 28 and not dead[:4].any()
    single_code = torch.zeros(5, dtype=torch.long)
    assert model.codebook_usage(single_code)["perplexity"] == pytest.approx(1.0)


def test_codebook_usage_refreshes_checkpointed_summary(model, images):
    model.train()(images)
    hits = model.quantizer.codebook_hits_0.double()
    usage = model.codebook_usage()
    probs = hits[hits > 0] / hits.sum()
    expected_perplexity = math.exp(-(probs * probs.log()).sum().item())
    assert usage["perplexity"] == pytest.approx(expected_perplexity)
    summary = {k.rsplit(".", 1)[1]: v for k, v in model.state_dict().items()}
    assert summary["perplexities"].item() == pytest.approx(usage["perplexity"])
    assert summary["percentage_hits"].item() == pytest.approx(usage["used_fraction"])
    assert summary["max_hits"].item() == hits.max().item()


def test_reseed_changes_only_dead_codes(model, images):
    output = model(images)
    dead = model.dead_codes(output.indices)
    assert dead.any() and not dead.all()
    before = model.quantizer.codebook.detach().clone()
    generator = torch.Generator().manual_seed(0)
    reseeded = model.reseed_dead_codes(output.latent, dead, generator=generator)
    after = model.quantizer.codebook.detach()
    assert reseeded == int(dead.sum())
    assert torch.equal(after[~dead], before[~dead])
    assert not torch.isclose(after[dead], before[dead]).all(dim=1).any()
    # each reseeded code is one of the recent latent vectors
    vectors = output.latent.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    distances = (after[dead][:, None] - vectors[None]).abs().amax(-1)
    assert distances.min(dim=1).values.max() < 1e-6


def test_reseed_rejects_wrong_shapes(model):
    with pytest.raises(ValueError, match="dead_mask"):
        model.reseed_dead_codes(torch.randn(10, 4), torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="recent_latents"):
        model.reseed_dead_codes(torch.randn(10, 3), torch.ones(32, dtype=torch.bool))


def test_from_state_dict_round_trip(images):
    torch.manual_seed(0)
    model = VQVAE(**TINY_VQVAE, attention_levels=(1, 3)).eval()
    model.train()(images)  # non-zero hit counts travel too
    restored = VQVAE.from_state_dict(model.state_dict()).eval()
    assert restored.config == model.eval().config
    assert torch.equal(restored.quantizer.codebook_hits_0, model.quantizer.codebook_hits_0)
    with torch.no_grad():
        assert torch.equal(restored(images).images, model(images).images)


def test_from_state_dict_rejects_foreign_state_dicts(model):
    with pytest.raises(IllmError, match="encoder.conv_in.weight"):
        VQVAE.from_state_dict({"weight": torch.zeros(1)})
    state = model.state_dict()
    state["decoder.conv_out.bias"] = torch.zeros(5)
    with pytest.raises(IllmError, match="decoder.conv_out.bias"):
        VQVAE.from_state_dict(state)
    state = model.state_dict()
    del state["decoder.up.0.block.1.conv1.weight"]
    with pytest.raises(IllmError, match="missing"):
        VQVAE.from_state_dict(state)


def test_bad_architecture_is_a_config_error():
    with pytest.raises(ConfigError, match="attention_levels"):
        VQVAE(**TINY_VQVAE, attention_levels=(4,))
