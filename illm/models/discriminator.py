"""MS-ILLM's conditional U-Net discriminator (an OASIS-style U-Net with a latent context).

The discriminator classifies every 8x8 patch of an image into ``num_classes`` classes: class 0
means "made by the generator", class ``k + 1`` means "real, and the VQ-VAE labeller gives it
codebook entry ``k``". It sees the image together with the autoencoder's latent, which is mapped
to a few feature channels and upsampled to the image size.

Module names follow the official NeuralCompression implementation, so its state dicts load
unchanged (hence the ``_unet.model.0.child.child...`` nesting and the index-numbered blocks).
"""

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from illm.errors import ConfigError, IllmError
from illm.models.layers import load_strict

NORM_TYPES = ("identity", "spectral", "instance", "batch")
UNET_WIDTHS = (128, 128, 256, 256, 512, 512)
HEAD_CHANNELS = 64  # width of the last upsampling level, fixed by the official architecture


def _norm_layer(channels: int, norm_type: str) -> nn.Module:
    if norm_type == "batch":
        return nn.BatchNorm2d(channels)
    if norm_type == "instance":
        return nn.InstanceNorm2d(channels)
    return nn.Identity()  # "identity" and "spectral" (which normalises the conv weights instead)


def _conv(
    in_channels: int, out_channels: int, kernel_size: int, norm_type: str, bias: bool = True
) -> nn.Module:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
    return spectral_norm(conv) if norm_type == "spectral" else conv


def _shortcut_conv(in_channels: int, out_channels: int, norm_type: str) -> nn.Module:
    if in_channels == out_channels:
        return nn.Identity()
    return _conv(in_channels, out_channels, 1, norm_type)


class UNetLevel(nn.Module):
    """One level of the U-Net: down-block, the deeper levels (``child``), optional up-block.

    The down-block is a residual block (two 3x3 convs, then 2x average pooling) from
    ``in_channels`` to ``down_channels``. Unless ``upsample`` is False ("clipped" levels, which
    keep the output at a coarser resolution), the up-block is a residual block that doubles the
    resolution (nearest) and maps ``down_channels`` to ``out_channels``. Both blocks use
    pre-activation (norm, LeakyReLU(0.2), conv); the outermost level (``top``) does not activate
    its raw input. With batch norm the first conv of each block has no bias.
    """

    def __init__(
        self,
        in_channels: int,
        down_channels: int,
        out_channels: int,
        child: nn.Module,
        upsample: bool,
        top: bool = False,
        norm_type: str = "identity",
    ):
        super().__init__()
        self.child = child  # registered first, like the official module: same state-dict order
        conv_bias = norm_type != "batch"
        self.left_block = nn.Sequential(
            nn.Identity() if top else _norm_layer(in_channels, norm_type),
            nn.Identity() if top else nn.LeakyReLU(0.2),
            _conv(in_channels, down_channels, 3, norm_type, bias=conv_bias),
            _norm_layer(down_channels, norm_type),
            nn.LeakyReLU(0.2),
            _conv(down_channels, down_channels, 3, norm_type),
            nn.AvgPool2d(2),
        )
        self.left_shortcut = nn.Sequential(
            _shortcut_conv(in_channels, down_channels, norm_type), nn.AvgPool2d(2)
        )
        self.right_block: nn.Sequential | None = None
        self.right_shortcut: nn.Sequential | None = None
        if upsample:
            self.right_block = nn.Sequential(
                _norm_layer(down_channels, norm_type),
                nn.LeakyReLU(0.2),
                nn.Upsample(scale_factor=2, mode="nearest"),
                _conv(down_channels, out_channels, 3, norm_type, bias=conv_bias),
                _norm_layer(out_channels, norm_type),
                nn.LeakyReLU(0.2),
                _conv(out_channels, out_channels, 3, norm_type),
            )
            self.right_shortcut = nn.Sequential(
                _shortcut_conv(down_channels, out_channels, norm_type),
                nn.Upsample(scale_factor=2, mode="nearest"),
            )
        # The official blocks use an in-place LeakyReLU. Where the norm in front of it is the
        # identity, that activation overwrites the block's input, so the shortcut sees the
        # activated input too. Official checkpoints were trained that way; reproduce it.
        self.shortcut_sees_activation = norm_type in ("identity", "spectral")

    def _residual(self, block: nn.Sequential, shortcut: nn.Sequential, x: Tensor) -> Tensor:
        if self.shortcut_sees_activation:
            x = block[:2](x)
            return block[2:](x) + shortcut(x)
        return block(x) + shortcut(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.child(self._residual(self.left_block, self.left_shortcut, x))
        if self.right_block is None:
            return x
        return self._residual(self.right_block, self.right_shortcut, x)


class UNet(nn.Module):
    """The residual U-Net and its 1x1 classifier, at ``1 / output_factor`` of the input size.

    ``channels[0]`` is the input width, ``channels[d + 1]`` the width after ``d + 1`` poolings.
    The deepest ``len(channels) - 1 - log2(output_factor)`` levels upsample again; the last of
    them outputs ``HEAD_CHANNELS`` features, which the outer (clipped) levels pass through.
    """

    def __init__(self, num_classes: int, channels: Sequence[int], output_factor: int, norm_type: str):
        super().__init__()
        num_levels = len(channels) - 1
        num_upsampling = num_levels - int(math.log2(output_factor))
        level: nn.Module = nn.Identity()
        for depth in reversed(range(num_levels)):
            from_inside = num_levels - 1 - depth
            level = UNetLevel(
                in_channels=channels[depth],
                down_channels=channels[depth + 1],
                out_channels=HEAD_CHANNELS if from_inside == num_upsampling - 1 else channels[depth],
                child=level,
                upsample=from_inside < num_upsampling,
                top=depth == 0,
                norm_type=norm_type,
            )
        self.model = nn.Sequential(level, nn.Conv2d(HEAD_CHANNELS, num_classes, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class ConditionalUNetDiscriminator(nn.Module):
    """Per-patch classifier of images conditioned on the autoencoder latent (MS-ILLM).

    Args:
        num_classes: output logits per position; 1 (fake) + the labeller's codebook size.
        context_in_channels: channels of the context (the autoencoder latent).
        context_out_channels: features the context is mapped to (3x3 reflect-padded conv,
            LeakyReLU(0.2)) before being upsampled to the image and concatenated to it.
        channels: U-Net widths, the first being the input width ``3 + context_out_channels``;
            by default ``(3 + context_out_channels, 128, 128, 256, 256, 512, 512)``.
        output_factor: the logits are at ``1 / output_factor`` of the image size
            (a power of two, at most ``2 ** (len(channels) - 2)``).
        norm_type: one of ``"identity"``, ``"spectral"``, ``"instance"``, ``"batch"``.

    Defaults are the official architecture (``condunet_ch1025_factor8_context220``).
    """

    def __init__(
        self,
        num_classes: int = 1025,
        context_in_channels: int = 220,
        context_out_channels: int = 16,
        channels: Sequence[int] | None = None,
        output_factor: int = 8,
        norm_type: str = "identity",
    ):
        super().__init__()
        if channels is None:
            channels = (3 + context_out_channels, *UNET_WIDTHS)
        channels = tuple(channels)
        _check_config(
            num_classes, context_in_channels, context_out_channels, channels, output_factor, norm_type
        )
        self.num_classes = num_classes
        self.context_in_channels = context_in_channels
        self.channels = channels
        self.output_factor = output_factor
        self.norm_type = norm_type
        self.size_multiple = 2 ** (len(channels) - 1)  # image sides must be multiples of this

        self._unet = UNet(num_classes, channels, output_factor, norm_type)
        self.input_sequence = nn.Sequential(
            nn.Conv2d(context_in_channels, context_out_channels, 3, padding=1, padding_mode="reflect"),
            nn.LeakyReLU(0.2),
        )

    def forward(self, images: Tensor, context: Tensor) -> Tensor:
        """Logits ``B x num_classes x H/f x W/f`` for images in [0, 1] and their latent.

        The context is detached: the discriminator loss never trains the encoder.
        """
        self._check_inputs(images, context)
        context_features = self.input_sequence(context.detach())
        context_features = F.interpolate(context_features, size=images.shape[-2:], mode="nearest")
        return self._unet(torch.cat([images, context_features], dim=1))

    def _check_inputs(self, images: Tensor, context: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise IllmError(f"discriminator: images must be B x 3 x H x W, got shape {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.size_multiple or width % self.size_multiple:
            raise IllmError(
                f"discriminator: image size {height}x{width} is not a multiple of {self.size_multiple}"
            )
        if context.ndim != 4 or context.shape[:2] != (images.shape[0], self.context_in_channels):
            raise IllmError(
                f"discriminator: context must be {images.shape[0]} x {self.context_in_channels} x h x w "
                f"for {images.shape[0]} images, got shape {tuple(context.shape)}"
            )

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, Tensor], norm_type: str | None = None
    ) -> "ConditionalUNetDiscriminator":
        """Build the discriminator that ``state_dict`` belongs to and load it (strictly).

        Class count, context widths, U-Net widths and output factor are read from tensor
        shapes. The norm is inferred too (spectral and batch norm leave their own keys), except
        that instance norm has no weights and looks like the identity: pass ``norm_type`` then.
        """
        context_weight = _conv_weight(state_dict, "input_sequence.0")
        classifier_weight = _conv_weight(state_dict, "_unet.model.1")
        channels, num_upsampling = _read_levels(state_dict)
        model = cls(
            num_classes=classifier_weight.shape[0],
            context_in_channels=context_weight.shape[1],
            context_out_channels=context_weight.shape[0],
            channels=channels,
            output_factor=2 ** (len(channels) - 1 - num_upsampling),
            norm_type=norm_type or _infer_norm_type(state_dict),
        )
        load_strict(model, state_dict, "discriminator")
        return model


def _check_config(
    num_classes: int,
    context_in_channels: int,
    context_out_channels: int,
    channels: tuple[int, ...],
    output_factor: int,
    norm_type: str,
) -> None:
    sizes = {
        "num_classes": num_classes,
        "context_in_channels": context_in_channels,
        "context_out_channels": context_out_channels,
    }
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"discriminator: {name} must be a positive integer, got {value!r}")
    if len(channels) < 2 or not all(isinstance(c, int) and c >= 1 for c in channels):
        raise ConfigError(f"discriminator: channels must be at least two positive integers, got {channels}")
    if channels[0] != 3 + context_out_channels:
        raise ConfigError(
            f"discriminator: channels[0] must be 3 + context_out_channels = {3 + context_out_channels}, "
            f"got {channels[0]}"
        )
    max_factor = 2 ** (len(channels) - 2)
    if not isinstance(output_factor, int) or output_factor < 1 or output_factor & (output_factor - 1):
        raise ConfigError(f"discriminator: output_factor must be a power of two, got {output_factor!r}")
    if output_factor > max_factor:
        raise ConfigError(
            f"discriminator: output_factor {output_factor} is too large for {len(channels) - 1} "
            f"U-Net levels (at most {max_factor})"
        )
    if norm_type not in NORM_TYPES:
        raise ConfigError(f"discriminator: norm_type must be one of {NORM_TYPES}, got {norm_type!r}")


def _find_conv_weight(state_dict: Mapping[str, Tensor], prefix: str) -> Tensor | None:
    for key in (f"{prefix}.weight", f"{prefix}.parametrizations.weight.original"):
        if key in state_dict:
            return state_dict[key]
    return None


def _conv_weight(state_dict: Mapping[str, Tensor], prefix: str) -> Tensor:
    weight = _find_conv_weight(state_dict, prefix)
    if weight is None:
        raise IllmError(f"not a conditional U-Net discriminator state dict: no key {prefix}.weight")
    return weight


def _read_levels(state_dict: Mapping[str, Tensor]) -> tuple[tuple[int, ...], int]:
    """The U-Net widths, and how many levels upsample, read level by level from the outside in."""
    prefix = "_unet.model.0"
    channels = [_conv_weight(state_dict, f"{prefix}.left_block.2").shape[1]]
    num_upsampling = 0
    while (down_conv := _find_conv_weight(state_dict, f"{prefix}.left_block.2")) is not None:
        channels.append(down_conv.shape[0])
        if any(key.startswith(f"{prefix}.right_block.") for key in state_dict):
            num_upsampling += 1
        prefix += ".child"
    return tuple(channels), num_upsampling


def _infer_norm_type(state_dict: Mapping[str, Tensor]) -> str:
    if any(key.endswith(".parametrizations.weight.original") for key in state_dict):
        return "spectral"
    if any(key.endswith(".running_mean") for key in state_dict):
        return "batch"
    return "identity"
