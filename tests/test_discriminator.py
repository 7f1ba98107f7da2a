"""Behaviour of the conditional U-Net discriminator, on tiny versions of it."""

import pytest
import torch

from illm.errors import ConfigError, IllmError
from illm.models.discriminator import NORM_TYPES, ConditionalUNetDiscriminator

TINY = dict(num_classes=5, context_in_channels=6, context_out_channels=4, channels=(7, 8, 8, 16, 16))


def tiny(**overrides) -> ConditionalUNetDiscriminator:
    torch.manual_seed(0)
    return ConditionalUNetDiscriminator(**{**TINY, **overrides})


def inputs(batch: int = 2, height: int = 64, width: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(batch, 3, height, width, generator=generator)
    context = torch.randn(batch, TINY["context_in_channels"], height // 16, width // 16, generator=generator)
    return images, context


@pytest.mark.parametrize("height, width", [(64, 64), (64, 192), (128, 32)])
def test_logits_are_at_an_eighth_of_the_image_size(height, width):
    images, context = inputs(2, height, width)
    original = images.clone()
    logits = tiny().eval()(images, context)
    assert logits.shape == (2, TINY["num_classes"], height // 8, width // 8)
    assert torch.equal(images, original)


@pytest.mark.parametrize("output_factor", [1, 2, 4, 8])
def test_output_factor_sets_resolution_and_is_inferred_from_weights(output_factor):
    model = tiny(output_factor=output_factor).eval()
    images, context = inputs(1, 32, 48)
    logits = model(images, context)
    assert logits.shape[-2:] == (32 // output_factor, 48 // output_factor)

    rebuilt = ConditionalUNetDiscriminator.from_state_dict(model.state_dict()).eval()
    assert (rebuilt.output_factor, rebuilt.channels, rebuilt.num_classes) == (
        output_factor,
        TINY["channels"],
        TINY["num_classes"],
    )
    assert torch.equal(rebuilt(images, context), logits)


def test_context_is_detached_but_images_and_weights_get_gradients():
    model = tiny()
    images, context = inputs()
    images.requires_grad_(True)
    context.requires_grad_(True)
    model(images, context).square().mean().backward()
    assert context.grad is None
    assert images.grad is not None and images.grad.abs().sum() > 0
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_context_changes_the_logits():
    model = tiny().eval()
    images, context = inputs()
    assert not torch.allclose(model(images, context), model(images, torch.zeros_like(context)))


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_each_norm_trains_and_round_trips_through_its_state_dict(norm_type):
    model = tiny(norm_type=norm_type).train()
    images, context = inputs()
    model(images, context).square().mean().backward()
    grads = [param.grad for param in model.parameters()]
    assert all(grad is not None and torch.isfinite(grad).all() for grad in grads)

    model.eval()
    with torch.no_grad():
        logits = model(images, context)
    # instance norm has no weights of its own, so it cannot be told from the identity
    hint = "instance" if norm_type == "instance" else None
    rebuilt = ConditionalUNetDiscriminator.from_state_dict(model.state_dict(), norm_type=hint).eval()
    assert rebuilt.norm_type == norm_type
    with torch.no_grad():
        assert torch.equal(rebuilt(images, context), logits)


def test_batch_norm_drops_the_bias_of_the_first_conv_of_each_block():
    keys = tiny(norm_type="batch").state_dict().keys()
    assert "_unet.model.0.left_block.2.bias" not in keys
    assert "_unet.model.0.left_block.5.bias" in keys
    assert "_unet.model.0.left_block.3.running_mean" in keys


@pytest.mark.parametrize(
    "make_inputs",
    [
        lambda: (torch.rand(1, 4, 64, 64), torch.randn(1, 6, 4, 4)),  # RGBA image
        lambda: (torch.rand(3, 64, 64), torch.randn(1, 6, 4, 4)),  # no batch dim
        lambda: (torch.rand(1, 3, 64, 72), torch.randn(1, 6, 4, 4)),  # width not a multiple of 16
        lambda: (torch.rand(1, 3, 64, 64), torch.randn(1, 5, 4, 4)),  # wrong context width
        lambda: (torch.rand(2, 3, 64, 64), torch.randn(1, 6, 4, 4)),  # batch sizes differ
    ],
)
def test_bad_inputs_raise_one_line_errors(make_inputs):
    with pytest.raises(IllmError, match="discriminator"):
        tiny()(*make_inputs())


@pytest.mark.parametrize(
    "overrides",
    [
        dict(norm_type="layer"),
        dict(output_factor=3),
        dict(output_factor=16),  # four levels can be clipped to 1/8 at most
        dict(channels=(8, 8, 8)),  # first width must be 3 + context_out_channels
        dict(channels=(7,)),
        dict(num_classes=0),
    ],
)
def test_bad_configs_raise_config_error(overrides):
    with pytest.raises(ConfigError):
        tiny(**overrides)


def test_foreign_or_damaged_state_dicts_raise_illm_error():
    with pytest.raises(IllmError, match="no key"):
        ConditionalUNetDiscriminator.from_state_dict({"weight": torch.zeros(1)})

    state = tiny().state_dict()
    del state["_unet.model.0.left_shortcut.0.bias"]
    with pytest.raises(IllmError, match="missing _unet.model.0.left_shortcut.0.bias"):
        ConditionalUNetDiscriminator.from_state_dict(state)

    state = tiny().state_dict()
    state["_unet.model.1.bias"] = torch.zeros(7)
    with pytest.raises(IllmError, match="_unet.model.1.bias has shape"):
        ConditionalUNetDiscriminator.from_state_dict(state)
