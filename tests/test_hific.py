"""Behaviour of the HiFiC autoencoder, on a tiny model."""

import re

import pytest
import torch
import torch.nn.functional as F

from helpers.models import TINY_AUTOENCODER
from illm.errors import IllmError
from illm.models.hific import HiFiCAutoencoder


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return HiFiCAutoencoder(**{**TINY_AUTOENCODER, **overrides})


def images(*shape, seed=1):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def model():
    return tiny_model()


def test_training_forward_shapes_and_keys(model):
    output = model.train()(images(2, 3, 64, 128))
    assert output.images.shape == (2, 3, 64, 128)
    assert output.latent.shape == (2, 8, 4, 8)
    for likelihoods in (output.likelihoods, output.rounded_likelihoods):
        assert set(likelihoods) == {"latent", "hyper"}
        assert likelihoods["latent"].shape == (2, 8, 4, 8)
        assert likelihoods["hyper"].shape == (2, 8, 1, 2)
        assert all(((0 < value) & (value <= 1)).all() for value in likelihoods.values())


def test_straight_through_latent_passes_image_gradients_to_the_encoder(model):
    mean_output = model.hyper_synthesis_mean[-1]
    torch.nn.init.zeros_(mean_output.weight)  # means = bias: no gradient path through the hyperprior
    output = model.train()(images(1, 3, 64, 64))
    means = mean_output.bias.view(1, -1, 1, 1)
    offsets = output.latent - means
    torch.testing.assert_close(offsets, offsets.round(), atol=1e-5, rtol=0)
    output.images.square().mean().backward()
    assert model.encoder.blocks[0][0].weight.grad.abs().sum() > 0


def test_training_uses_noisy_likelihoods_and_eval_rounded_ones(model):
    x = images(1, 3, 64, 64)
    trained = model.train()(x)
    for key in ("latent", "hyper"):
        assert not torch.allclose(trained.likelihoods[key], trained.rounded_likelihoods[key])
    assert trained.likelihoods["latent"].requires_grad
    assert not trained.rounded_likelihoods["latent"].requires_grad

    with torch.no_grad():
        evaluated = model.eval()(x)
    for key in ("latent", "hyper"):
        torch.testing.assert_close(evaluated.likelihoods[key], evaluated.rounded_likelihoods[key])
    torch.testing.assert_close(trained.rounded_likelihoods["hyper"], evaluated.likelihoods["hyper"])


def test_eval_forward_is_deterministic(model):
    x = images(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.latent, second.latent)


def test_frozen_parts_stay_frozen_across_train_calls(model):
    model.freeze_encoder()
    model.freeze_bottleneck()
    model.train()
    assert model.decoder.training
    frozen = [
        model.encoder,
        model.hyper_analysis,
        model.hyper_synthesis_mean,
        model.hyper_synthesis_scale,
        model.hyper_bottleneck,
        model.latent_bottleneck,
    ]
    assert not any(module.training for part in frozen for module in part.modules())
    assert not any(param.requires_grad for part in frozen for param in part.parameters())
    assert all(param.requires_grad for param in model.decoder.parameters())

    output = model(images(1, 3, 64, 64))  # frozen entropy models round even in training
    for key in ("latent", "hyper"):
        torch.testing.assert_close(output.likelihoods[key], output.rounded_likelihoods[key])


def test_aux_loss_only_reaches_the_quantiles(model):
    model.aux_loss().backward()
    with_grad = {name for name, param in model.named_parameters() if param.grad is not None}
    assert with_grad == {"hyper_bottleneck.quantiles"}
    assert model.aux_parameters() == [model.hyper_bottleneck.quantiles]
    main = {id(param) for param in model.main_parameters()}
    assert len(main) + 1 == len(list(model.parameters()))
    assert id(model.hyper_bottleneck.quantiles) not in main


@pytest.mark.parametrize("height, width", [(50, 70), (64, 128), (1, 1), (3, 130)])
def test_compress_decompress_round_trip(model, height, width):
    model.eval()
    batch = images(2, 3, height, width)
    strings = model.compress(batch)
    assert len(strings) == 2 and strings[0] != strings[1]
    for image, (latent_string, hyper_string) in zip(batch, strings):
        decoded = model.decompress(latent_string, hyper_string, height, width)
        assert decoded.shape == (1, 3, height, width)
        assert 0 <= decoded.min() and decoded.max() <= 1
        if height > 32 and width > 64:  # one reflection step: compare with the eval forward
            padded = F.pad(image[None], (0, -width % 64, 0, -height % 64), mode="reflect")
            with torch.no_grad():
                expected = model(padded).images[:, :, :height, :width].clamp(0, 1)
            torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=0)


def test_strings_decode_across_model_dtypes(model):
    model.eval()
    x = images(1, 3, 64, 64)
    double = tiny_model().double().eval()
    [(latent_string, hyper_string)] = double.compress(x)
    assert double.hyper_synthesis_mean[0].weight.dtype == torch.float64  # entropy path ran on a copy
    torch.testing.assert_close(
        double.decompress(latent_string, hyper_string, 64, 64),
        model.decompress(latent_string, hyper_string, 64, 64),
        atol=1e-5,
        rtol=0,
    )


def test_state_dicts_load_between_updated_and_never_updated_models():
    x = images(1, 3, 40, 90)
    updated = tiny_model().eval()
    never_updated_state = tiny_model().state_dict()
    assert updated.update(force=True)
    expected_strings = updated.compress(x)

    fresh = tiny_model(seed=5).eval()
    fresh.load_state_dict(updated.state_dict(), strict=True)
    assert fresh.compress(x) == expected_strings
    assert not fresh.update()  # the tables came with the state dict

    updated.load_state_dict(never_updated_state, strict=True)
    assert updated.hyper_bottleneck._quantized_cdf.numel() == 0
    assert updated.compress(x) == expected_strings  # tables are rebuilt on demand


def test_state_dicts_with_compressai_1_1_key_names_load(model):
    updated = tiny_model(seed=3).eval()
    updated.update()
    legacy_names = {"matrices": "_matrix", "biases": "_bias", "factors": "_factor"}
    legacy_state = {
        re.sub(
            r"hyper_bottleneck\.(matrices|biases|factors)\.(\d+)",
            lambda m: f"hyper_bottleneck.{legacy_names[m[1]]}{m[2]}",
            name,
        ): value
        for name, value in updated.state_dict().items()
    }
    assert "hyper_bottleneck._matrix0" in legacy_state
    model.load_state_dict(legacy_state, strict=True)
    assert torch.equal(model.hyper_bottleneck.biases[1], updated.hyper_bottleneck.biases[1])


def test_from_state_dict_recovers_the_architecture():
    original = tiny_model(num_residual_blocks=2, hyper_channels=12).eval()
    original.update()
    rebuilt = HiFiCAutoencoder.from_state_dict(original.state_dict()).eval()
    assert len(rebuilt.decoder.resid_blocks) == 2
    assert rebuilt.hyper_bottleneck.channels == 12
    x = images(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x).images, original(x).images)


def test_from_state_dict_rejects_foreign_state_dicts(model):
    with pytest.raises(IllmError, match="encoder.blocks.5.weight"):
        HiFiCAutoencoder.from_state_dict({"conv.weight": torch.zeros(1, 1, 1, 1)})
    state = model.state_dict()
    state["decoder.blocks.4.weight"] = torch.zeros(3, 9, 7, 7)
    with pytest.raises(IllmError, match="decoder.blocks.4.weight"):
        HiFiCAutoencoder.from_state_dict(state)


def test_bf16_autocast_forward_keeps_likelihoods_in_float32(model):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model.train()(images(1, 3, 64, 64))
    assert output.images.dtype == torch.bfloat16
    assert output.latent.dtype == torch.float32  # rounded around float32 means
    for likelihoods in (output.likelihoods, output.rounded_likelihoods):
        assert all(value.dtype == torch.float32 for value in likelihoods.values())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.aux_loss().dtype == torch.float32


def test_bad_inputs_raise_one_line_errors(model):
    with pytest.raises(IllmError, match="multiples of 64"):
        model(images(1, 3, 64, 100))
    with pytest.raises(IllmError, match="B x 3 x H x W"):
        model.compress(images(3, 64, 64))
    with pytest.raises(IllmError, match="float"):
        model.compress(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(IllmError, match="height"):
        model.decompress(b"", b"", 0, 10)


def test_bf16_autocast_runs_the_hyperprior_in_float32(model):
    """Under training autocast the hyper-analysis and both hyper-syntheses take and give float32,
    equal to the float32 computation of the same inputs (issue 18, point 3)."""
    seen = {}

    def remember(name):
        def hook(module, inputs, output):
            seen[name] = (inputs[0].detach(), output.detach())

        return hook

    for name in ("hyper_analysis", "hyper_synthesis_mean", "hyper_synthesis_scale"):
        getattr(model, name).register_forward_hook(remember(name))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()(images(2, 3, 64, 64))
    for name, (given, output) in seen.items():
        assert given.dtype == torch.float32 and output.dtype == torch.float32, name
        with torch.no_grad():
            assert torch.equal(output, getattr(model, name)(given)), name
