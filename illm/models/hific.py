"""The HiFiC autoencoder with a mean-scale hyperprior (Mentzer et al. 2020), as used by MS-ILLM.

Module names, layer order and padding follow the `HiFiCAutoencoder` of
facebookresearch/NeuralCompression, so its released state dicts load here unchanged. The entropy
models are compressai's `EntropyBottleneck` (hyper-latent) and `GaussianConditional` (latent).
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from illm import backends, rans, tiling
from illm.errors import IllmError
from illm.models._compressai import EntropyBottleneck, GaussianConditional
from illm.models.layers import ChannelNorm2d, load_strict

# compressai's coder tables: sized by `update()`, empty in a model that was never updated.
_CODER_TABLES = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")

# The latent coder's scales: compressai's `get_scale_table()` (64 log-spaced scales from 0.11 to
# 256), written out because importing compressai.models costs seconds; a test compares the two.
_SCALE_TABLE_RANGE = (0.11, 256.0, 64)

# What `HiFiCAutoencoder.set_precision` accepts: the dtype the encoder and the generator run in.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}

_LEGACY_PARAMETER_LISTS = {"matrix": "matrices", "bias": "biases", "factor": "factors"}

_ENTROPY_MODULES = (
    "hyper_analysis",
    "hyper_synthesis_mean",
    "hyper_synthesis_scale",
    "hyper_bottleneck",
    "latent_bottleneck",
)


@dataclass
class AutoencoderOutput:
    """What `HiFiCAutoencoder.forward` returns.

    `images` is the unclamped reconstruction; `latent` is what the generator received.
    `likelihoods` hold noisy-value likelihoods in training (for the rate loss) and rounded-value
    likelihoods in eval; `rounded_likelihoods` always hold those of the rounded values (true bpp).
    Both dicts have the keys "latent" and "hyper".
    """

    images: Tensor | None  # None from `forward(..., decode=False)`
    latent: Tensor
    hyper_latent: Tensor  # noisy in training, rounded in eval
    likelihoods: dict[str, Tensor]
    rounded_likelihoods: dict[str, Tensor]


def _conv_norm_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2)
    return nn.Sequential(conv, ChannelNorm2d(out_channels), nn.ReLU())


def _upconv_norm_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    upconv = nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1)
    return nn.Sequential(upconv, ChannelNorm2d(out_channels), nn.ReLU())


class _FusedChannelNorm2d(ChannelNorm2d):
    """A `ChannelNorm2d` that always takes its fused ``layer_norm`` path, for bf16 coding: on a
    CPU about 5x faster in bf16 than the separate reductions, with float32 statistics. Not
    bit-identical to the official operations, which float32 coding keeps."""

    def forward(self, x: Tensor) -> Tensor:
        return self._fused(x)


class HiFiCEncoder(nn.Module):
    """Image -> latent at 1/16 resolution: a 7x7 conv, four stride-2 3x3 convs, a 3x3 conv."""

    def __init__(self, latent_channels: int, channels: tuple[int, ...]):
        super().__init__()
        blocks = [_conv_norm_relu(3, channels[0], kernel_size=7, stride=1)]
        for in_channels, out_channels in zip(channels[:-1], channels[1:]):
            blocks.append(_conv_norm_relu(in_channels, out_channels, kernel_size=3, stride=2))
        blocks.append(nn.Conv2d(channels[-1], latent_channels, 3, padding=1))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, images: Tensor) -> Tensor:
        return self.blocks(images)


class ResidualBlock(nn.Module):
    """x + (conv, norm, relu, conv, norm)(x)."""

    def __init__(self, channels: int):
        super().__init__()
        self.sequence = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            ChannelNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            ChannelNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.sequence(x)


class HiFiCGenerator(nn.Module):
    """Latent -> image: norm + conv, residual blocks (with a skip around all of them), four
    stride-2 transposed convs, and a 7x7 conv to RGB. `channels` are the encoder's, reversed here."""

    def __init__(self, latent_channels: int, channels: tuple[int, ...], num_residual_blocks: int):
        super().__init__()
        channels = tuple(reversed(channels))
        self.block_0 = nn.Sequential(
            ChannelNorm2d(latent_channels),
            nn.Conv2d(latent_channels, channels[0], 3, padding=1),
            ChannelNorm2d(channels[0]),
        )
        self.resid_blocks = nn.Sequential(*(ResidualBlock(channels[0]) for _ in range(num_residual_blocks)))
        blocks: list[nn.Module] = [
            _upconv_norm_relu(in_channels, out_channels)
            for in_channels, out_channels in zip(channels[:-1], channels[1:])
        ]
        blocks.append(nn.Conv2d(channels[-1], 3, 7, padding=3))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, latent: Tensor) -> Tensor:
        return self.head(self.trunk(latent))

    def trunk(self, latent: Tensor) -> Tensor:
        """The part at latent resolution: the norm and conv block and the residual blocks."""
        x = self.block_0(latent)
        return x + self.resid_blocks(x)

    def head(self, features: Tensor) -> Tensor:
        """The upsampling part: from the trunk's features to the image."""
        return self.blocks(features)


def _hyper_analysis(latent_channels: int, hyper_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(latent_channels, hyper_channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(hyper_channels, hyper_channels, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv2d(hyper_channels, hyper_channels, 5, stride=2, padding=2),
    )


def _hyper_synthesis(hyper_channels: int, latent_channels: int) -> nn.Sequential:
    def upconv() -> nn.ConvTranspose2d:
        return nn.ConvTranspose2d(hyper_channels, hyper_channels, 5, stride=2, padding=2, output_padding=1)

    return nn.Sequential(
        upconv(),
        nn.ReLU(),
        upconv(),
        nn.ReLU(),
        nn.Conv2d(hyper_channels, latent_channels, 3, padding=1),
    )


def _prepare_entropy_model_load(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """Load-state-dict pre-hook of the entropy models, doing what compressai's
    `CompressionModel.load_state_dict` does for them, but at any nesting depth.

    The coder-table buffers get the shapes of the incoming ones: their size depends on whether
    (and with which weights) `update()` ran, so a strict load would otherwise fail between an
    updated model and a never-updated one. Keys of compressai < 1.2 (`_matrix0`, `_bias0`,
    `_factor0`, ...) are renamed to the current ones (`matrices.0`, ...).
    """
    for key in [key for key in state_dict if key.startswith(prefix)]:
        legacy = re.fullmatch(r"_(matrix|bias|factor)(\d+)", key[len(prefix) :])
        if legacy:
            kind, index = legacy.groups()
            state_dict[f"{prefix}{_LEGACY_PARAMETER_LISTS[kind]}.{index}"] = state_dict.pop(key)
    for name in _CODER_TABLES:
        incoming = state_dict.get(prefix + name)
        current = getattr(module, name, None)
        if isinstance(incoming, Tensor) and isinstance(current, Tensor) and current.shape != incoming.shape:
            setattr(module, name, current.new_empty(incoming.shape))


def scale_table() -> Tensor:
    """The scales of the latent coder's tables, as compressai's `get_scale_table()` makes them."""
    low, high, levels = _SCALE_TABLE_RANGE
    return torch.exp(torch.linspace(math.log(low), math.log(high), levels))


def scale_indexes(bottleneck: GaussianConditional, scales: Tensor) -> Tensor:
    """compressai's `GaussianConditional.build_indexes`, the same int32 indexes: for each scale,
    the number of table scales (but the last) below it, found by one binary search instead of a
    pass over all the scales per table entry (64 passes, most of the coder's time)."""
    scales = bottleneck.lower_bound_scale(scales)
    indexes = torch.searchsorted(bottleneck.scale_table[:-1].contiguous(), scales, out_int32=True)
    return indexes.masked_fill_(scales.isnan(), len(bottleneck.scale_table) - 1)  # no scale is above NaN


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False)


def _cpu_float32_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` on the CPU with float32 floating-point tensors and no gradients,
    made without a second copy on the module's own device."""

    def converted(tensor: Tensor) -> Tensor:
        dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
        return tensor.detach().to("cpu", dtype, copy=True)

    memo: dict[int, object] = {id(buffer): converted(buffer) for buffer in module.buffers()}
    for parameter in module.parameters():
        memo[id(parameter)] = nn.Parameter(converted(parameter), requires_grad=False)
    return copy.deepcopy(module, memo)


def _weights_key(modules: list[nn.Module]) -> tuple:
    """What identifies the current weights of ``modules``: each tensor's identity, storage, dtype
    and shape, and float64 sums and norms of its values. Optimizer steps (fused ones too, which
    leave PyTorch's version counters alone), loads, moves and rebuilt tables all change it."""
    tensors = [tensor for module in modules for tensor in (*module.parameters(), *module.buffers())]
    layout = tuple((id(t), t.data_ptr(), t.dtype, t.device, tuple(t.shape)) for t in tensors)
    statistics: dict[torch.device, list[Tensor]] = {}
    for tensor in tensors:  # one transfer per device, not one per tensor
        values = tensor.detach() if tensor.is_floating_point() else tensor.detach().double()
        total = values.sum(dtype=torch.float64)
        norm = torch.linalg.vector_norm(values, dtype=torch.float64)
        statistics.setdefault(tensor.device, []).append(torch.stack([total, norm]))
    return layout, tuple(tuple(torch.stack(pairs).cpu().flatten().tolist()) for pairs in statistics.values())


def _quantize_ste(latent: Tensor, means: Tensor) -> Tensor:
    """round(latent - means) + means in the forward pass, identity in the backward pass.

    Written as the official model computes it (compressai's `quantize_ste` of the centred
    latent), so that the float32 values agree to the last bit.
    """
    centred = latent - means
    return (torch.round(centred) - centred).detach() + centred + means


def _pad_to_multiple(images: Tensor, multiple: int) -> Tensor:
    """Reflect-pads the bottom and right edges up to a multiple of `multiple`.

    Reflection can add at most size-1 pixels at once, so small images are padded in several
    steps (a 1-pixel side is first replicated). Where one step suffices this is exactly the
    official padding.
    """
    height, width = images.shape[-2:]
    if height == 1 or width == 1:
        images = F.pad(images, (0, int(width == 1), 0, int(height == 1)), mode="replicate")
    while True:
        height, width = images.shape[-2:]
        pad_height, pad_width = -height % multiple, -width % multiple
        if pad_height == 0 and pad_width == 0:
            return images
        images = F.pad(images, (0, min(pad_width, width - 1), 0, min(pad_height, height - 1)), mode="reflect")


@dataclass
class _EntropyCoder:
    """The hyperprior path between the latent and its two byte strings.

    It always runs on the CPU in float32: the decoder must compute bit-identical means and scales
    to the encoder's, and GPU convolutions are not reproducible across machines.
    """

    hyper_analysis: nn.Module
    hyper_synthesis_mean: nn.Module
    hyper_synthesis_scale: nn.Module
    hyper_bottleneck: EntropyBottleneck
    latent_bottleneck: GaussianConditional

    def encode(self, latent: Tensor) -> tuple[list[bytes], list[bytes]]:
        hyper = self.hyper_analysis(latent)
        hyper_strings = self.hyper_bottleneck.compress(hyper)
        latent_strings = []
        for index, hyper_string in enumerate(hyper_strings):
            indexes, means = self._indexes_and_means(hyper_string, tuple(hyper.shape[-2:]))
            latent_strings += self.latent_bottleneck.compress(latent[index : index + 1], indexes, means=means)
        return latent_strings, hyper_strings

    def decode(self, latent_string: bytes, hyper_string: bytes, hyper_size: tuple[int, int]) -> Tensor:
        """The latent the two strings code. Any bytes decode or raise `FormatError`: the strings
        are read by `illm.rans`, which checks every read and bounds every escape."""
        indexes, means = self._indexes_and_means(hyper_string, hyper_size)
        symbols = rans.decode(latent_string, indexes, rans.CoderTables(self.latent_bottleneck))
        return self.latent_bottleneck.dequantize(symbols, means)

    def minimum_payload_bytes(self, hyper_size: tuple[int, int]) -> int:
        """The fewest bytes that a latent string and a hyper string for ``hyper_size`` can take
        together: every symbol coded with the most probable symbol of the most favourable table."""
        pixels = hyper_size[0] * hyper_size[1]
        hyper_bits = pixels * sum(rans.CoderTables(self.hyper_bottleneck).minimum_bits())
        latent_symbols = pixels * 16 * self.hyper_synthesis_mean[-1].out_channels
        latent_bits = latent_symbols * min(rans.CoderTables(self.latent_bottleneck).minimum_bits())
        return rans.minimum_string_bytes(hyper_bits) + rans.minimum_string_bytes(latent_bits)

    def _indexes_and_means(self, hyper_string: bytes, hyper_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        bottleneck = self.hyper_bottleneck
        indexes = bottleneck._build_indexes((1, bottleneck._quantized_cdf.size(0), *hyper_size))
        symbols = rans.decode(hyper_string, indexes, rans.CoderTables(bottleneck))
        hyper = bottleneck.dequantize(
            symbols, bottleneck._extend_ndims(bottleneck._get_medians().detach(), 2)
        )
        scales = self.hyper_synthesis_scale(hyper)
        return scale_indexes(self.latent_bottleneck, scales), self.hyper_synthesis_mean(hyper)


class HiFiCAutoencoder(nn.Module):
    """HiFiC encoder and generator around a mean-scale hyperprior, at 1/16 latent resolution.

    The defaults are the official MS-ILLM architecture; smaller widths make test-sized models.
    `forward` takes images in [0, 1] whose sides are multiples of `pad_multiple`; `compress` and
    `decompress` take any size and run the entropy path on the CPU in float32.
    """

    pad_multiple = 64

    def __init__(
        self,
        latent_channels: int = 220,
        hyper_channels: int = 320,
        encoder_channels: tuple[int, ...] = (60, 120, 240, 480, 960),
        num_residual_blocks: int = 9,
    ):
        super().__init__()
        encoder_channels = tuple(encoder_channels)
        if len(encoder_channels) != 5:
            raise IllmError(f"encoder_channels must have 5 entries (4 downsamplings), got {encoder_channels}")
        self.encoder = HiFiCEncoder(latent_channels, encoder_channels)
        self.decoder = HiFiCGenerator(latent_channels, encoder_channels, num_residual_blocks)
        self.hyper_analysis = _hyper_analysis(latent_channels, hyper_channels)
        self.hyper_synthesis_mean = _hyper_synthesis(hyper_channels, latent_channels)
        self.hyper_synthesis_scale = _hyper_synthesis(hyper_channels, latent_channels)
        self.hyper_bottleneck = EntropyBottleneck(hyper_channels)
        self.latent_bottleneck = GaussianConditional(scale_table=None)
        for bottleneck in (self.hyper_bottleneck, self.latent_bottleneck):
            bottleneck.register_load_state_dict_pre_hook(_prepare_entropy_model_load)
        self._frozen_encoder = False
        self._frozen_bottleneck = False
        # (weights key, CPU float32 copy of the entropy modules), for a model that lives elsewhere
        self._coder_cache: tuple[tuple, _EntropyCoder] | None = None

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor], *, assign: bool = False) -> HiFiCAutoencoder:
        """Builds the architecture that `state_dict` describes (official or tiny) and loads it.

        With ``assign`` the model takes the tensors of `state_dict` as its own (converted only
        where their dtype differs from the model's) instead of initialising its parameters at
        random and copying: much faster, for a state dict that nobody else will modify, such as
        one just read from a file.
        """
        if not isinstance(state_dict, Mapping):
            raise IllmError(f"expected a HiFiC autoencoder state dict, got {type(state_dict).__name__}")

        def out_channels(key: str) -> int:
            value = state_dict.get(key)
            if not isinstance(value, Tensor) or value.ndim != 4:
                raise IllmError(f"not a HiFiC autoencoder state dict: no 4-d tensor under key {key!r}")
            return value.shape[0]

        residual_indexes = {
            int(match.group(1))
            for key in state_dict
            if (match := re.match(r"decoder\.resid_blocks\.(\d+)\.", key))
        }
        with torch.device("meta") if assign else contextlib.nullcontext():
            model = cls(
                latent_channels=out_channels("encoder.blocks.5.weight"),
                hyper_channels=out_channels("hyper_analysis.0.weight"),
                encoder_channels=tuple(out_channels(f"encoder.blocks.{i}.0.weight") for i in range(5)),
                num_residual_blocks=len(residual_indexes),
            )
        if assign:  # the dtypes a copy into the model's own tensors would give
            dtypes = {name: tensor.dtype for name, tensor in model.state_dict().items()}
            state_dict = {
                name: tensor.to(dtypes.get(name, tensor.dtype)) for name, tensor in state_dict.items()
            }
        load_strict(model, state_dict, "HiFiC autoencoder", assign=assign)
        return model

    def forward(self, images: Tensor, decode: bool = True) -> AutoencoderOutput:
        """Encodes, quantizes and decodes `images` (B x 3 x H x W in [0, 1], sides multiples of 64).

        `decode=False` stops before the generator (`images` is then None): the latent and the
        rates, with the same random draws as a full forward.
        """
        self._check_images(images, need_multiple=True)
        latent = self.encoder(images)
        # The hyperprior runs in its weights' dtype (float32) under any autocast, as the codec's
        # does: the means that the rounding and the rate use must not be rounded to bf16 (about
        # 0.03 of a bin near 10).
        with _no_autocast(latent.device):
            hyper = self.hyper_analysis(latent.to(self.hyper_analysis[0].weight.dtype))
            hyper_hat, hyper_likelihoods = self.hyper_bottleneck(hyper)
            # As in the official model, the rounded likelihoods are those of the noisy hyper-latent
            # rounded around the medians. An entropy model in eval mode (frozen in stage 2, or
            # validation) has rounded already: its likelihoods are those.
            hyper_rounded_likelihoods = hyper_likelihoods.detach()
            if self.hyper_bottleneck.training:
                with torch.no_grad():
                    _, hyper_rounded_likelihoods = self.hyper_bottleneck(hyper_hat, training=False)
            means = self.hyper_synthesis_mean(hyper_hat)
            scales = self.hyper_synthesis_scale(hyper_hat)
            # compressai draws the training noise with `empty_like`, in memory order: a latent
            # in channels-last layout would get the same numbers at other positions.
            latent = latent.float().contiguous()
            latent_hat, latent_likelihoods = self.latent_bottleneck(latent, scales, means=means)
            # As in the official model, the rounded latent is judged by the means and scales of
            # the (noisy in training) hyper-latent that the rate loss uses.
            latent_rounded_likelihoods = latent_likelihoods.detach()
            if self.latent_bottleneck.training:
                with torch.no_grad():
                    _, latent_rounded_likelihoods = self.latent_bottleneck(
                        latent, scales, means=means, training=False
                    )
        if self.training:
            latent_hat = _quantize_ste(latent, means)
        return AutoencoderOutput(
            images=self.decoder(latent_hat) if decode else None,
            latent=latent_hat,
            hyper_latent=hyper_hat,
            likelihoods={"latent": latent_likelihoods, "hyper": hyper_likelihoods},
            rounded_likelihoods={"latent": latent_rounded_likelihoods, "hyper": hyper_rounded_likelihoods},
        )

    @torch.no_grad()
    def compress(self, images: Tensor, tile: int | None = None) -> list[tuple[bytes, bytes]]:
        """(latent string, hyper string) for each image of a B x 3 x H x W batch in [0, 1], any size.

        The encoder runs in tiles of ``tile`` pixels (`illm.tiling.resolve_tile`: None picks by
        image size, 0 never tiles); the strings do not depend on it, but for latent values within
        float rounding of a quantization boundary.
        """
        self._check_images(images, need_multiple=False)
        tile = tiling.resolve_tile(tile, *images.shape[-2:])
        padded = _pad_to_multiple(images, self.pad_multiple)
        with backends.full_float32():
            latent = tiling.encode(self.encoder, padded, tile)
        with _no_autocast(latent.device):
            latent_strings, hyper_strings = self._entropy_coder().encode(latent)
        return list(zip(latent_strings, hyper_strings))

    @torch.no_grad()
    def decompress(
        self, latent_string: bytes, hyper_string: bytes, height: int, width: int, tile: int | None = None
    ) -> Tensor:
        """The 1 x 3 x height x width image in [0, 1] that `compress` encoded into the two strings.

        The generator runs in tiles of ``tile`` pixels, as in `compress`. Any bytes either decode
        or raise `FormatError` (see `illm.rans`); the caller bounds height and width.
        """
        for name, value in (("latent_string", latent_string), ("hyper_string", hyper_string)):
            if not isinstance(value, bytes):
                raise IllmError(f"{name} must be bytes, got {type(value).__name__}")
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise IllmError(f"image {name} must be a positive integer, got {value!r}")
        tile = tiling.resolve_tile(tile, height, width)
        with _no_autocast(torch.device("cpu")):
            latent = self._entropy_coder().decode(latent_string, hyper_string, self.hyper_size(height, width))
        with backends.full_float32():
            images = tiling.generate(self.decoder, latent, tile)
        return images[:, :, :height, :width].clamp(0.0, 1.0)

    def hyper_size(self, height: int, width: int) -> tuple[int, int]:
        """The hyper-latent's height and width for an image of ``height`` x ``width``."""
        return -(-height // self.pad_multiple), -(-width // self.pad_multiple)

    def minimum_payload_bytes(self, height: int, width: int) -> int:
        """A lower bound on the payload of any valid file of this size (see `illm.rans`)."""
        return self._entropy_coder().minimum_payload_bytes(self.hyper_size(height, width))

    def set_precision(self, precision: str) -> HiFiCAutoencoder:
        """Run the encoder and the generator in ``precision`` ("fp32" or "bf16"), for coding.

        Only these two: the hyperprior path that turns the latent into bytes and back stays in
        float32 (on the CPU), so the latent a file decodes to does not depend on the precision
        that wrote or reads it. In bf16 the weights are kept channels-last, the layout in which
        CPU bf16 convolutions are fastest, and the channel norms take their fused path.
        Rounding to bf16 is one-way: load the weights again to get float32 back.
        """
        if precision not in PRECISIONS:
            raise IllmError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        fused = precision == "bf16"
        for network in (self.encoder, self.decoder):
            memory_format = torch.channels_last if fused else torch.contiguous_format
            network.to(PRECISIONS[precision], memory_format=memory_format)
            for module in network.modules():
                if isinstance(module, ChannelNorm2d):  # same parameters, another forward
                    module.__class__ = _FusedChannelNorm2d if fused else ChannelNorm2d
        return self

    @torch.no_grad()
    def update(self, force: bool = False) -> bool:
        """Builds the entropy coders' tables (if missing, or always with `force`); True if it did.

        The tables are computed on the CPU in float32 whatever the model's device and dtype (a
        decoder elsewhere must get the same tables from the same weights: CUDA's `erfc` and
        `softplus` need not round as the CPU's do), then stored in the model's buffers on its
        device. Like compressai's, tables once built stay until ``force``: after changing the
        entropy models' weights, call ``update(force=True)`` before coding.
        """
        bottlenecks = ("hyper_bottleneck", "latent_bottleneck")
        missing = [name for name in bottlenecks if force or getattr(self, name)._offset.numel() == 0]
        if not missing:
            return False
        coder = self._cpu_coder()
        with _no_autocast(torch.device("cpu")):
            if "hyper_bottleneck" in missing:
                coder.hyper_bottleneck.update(force=True)
            if "latent_bottleneck" in missing:
                coder.latent_bottleneck.update_scale_table(scale_table(), force=True)
        if coder.hyper_bottleneck is not self.hyper_bottleneck:  # a copy: give the model its tables
            for name in missing:
                built, own = getattr(coder, name), getattr(self, name)
                for table in _CODER_TABLES:
                    if isinstance(getattr(own, table, None), Tensor):
                        setattr(own, table, getattr(built, table).to(own._offset.device, copy=True))
            self._coder_cache = (self._entropy_weights_key(), coder)
        return True

    def aux_loss(self) -> Tensor:
        """The loss that fits the hyper-latent quantiles (it only reaches `aux_parameters()`)."""
        with _no_autocast(self.hyper_bottleneck.quantiles.device):
            return self.hyper_bottleneck.loss()

    def aux_parameters(self) -> list[nn.Parameter]:
        """The entropy bottleneck's quantiles, for the auxiliary optimizer."""
        return [self.hyper_bottleneck.quantiles]

    def main_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the quantiles (frozen ones included: their gradients stay None)."""
        return [param for name, param in self.named_parameters() if name != "hyper_bottleneck.quantiles"]

    def freeze_encoder(self) -> None:
        """Stops training the encoder: no gradients, and eval mode across later `.train()` calls."""
        self._frozen_encoder = True
        self._freeze(self.encoder)

    def freeze_bottleneck(self) -> None:
        """Freezes the hyper-analysis, both hyper-syntheses and the entropy models, like `freeze_encoder`.

        Frozen entropy models stay in eval mode, so their likelihoods are of rounded values.
        """
        self._frozen_bottleneck = True
        for name in _ENTROPY_MODULES:
            self._freeze(getattr(self, name))

    def train(self, mode: bool = True) -> HiFiCAutoencoder:
        """Sets train/eval mode like `nn.Module.train`, keeping frozen parts in eval mode."""
        super().train(mode)
        if self._frozen_encoder:
            self.encoder.eval()
        if self._frozen_bottleneck:
            for name in _ENTROPY_MODULES:
                getattr(self, name).eval()
        return self

    @staticmethod
    def _freeze(module: nn.Module) -> None:
        module.eval()
        module.requires_grad_(False)

    def _entropy_coder(self) -> _EntropyCoder:
        """The entropy path with built tables, on the CPU in float32."""
        self.update()
        return self._cpu_coder()

    def _cpu_coder(self) -> _EntropyCoder:
        """The entropy modules themselves when they are on the CPU in float32; else a CPU float32
        copy, made once and kept until the weights change (see `_weights_key`): coding an image
        no longer copies the hyperprior (about 68 MB at full size) from the GPU each time."""
        modules = {name: getattr(self, name) for name in _ENTROPY_MODULES}
        cpu = torch.device("cpu")
        on_cpu = all(
            tensor.device == cpu and (tensor.dtype == torch.float32 or not tensor.is_floating_point())
            for module in modules.values()
            for tensor in (*module.parameters(), *module.buffers())
        )
        if on_cpu:
            self._coder_cache = None
            return _EntropyCoder(**modules)
        key = self._entropy_weights_key()
        if self._coder_cache is None or self._coder_cache[0] != key:
            self._coder_cache = None  # free the old copy before making the new one
            copies = {name: _cpu_float32_copy(module) for name, module in modules.items()}
            self._coder_cache = (key, _EntropyCoder(**copies))
        return self._coder_cache[1]

    def _entropy_weights_key(self) -> tuple:
        return _weights_key([getattr(self, name) for name in _ENTROPY_MODULES])

    def _check_images(self, images: Tensor, need_multiple: bool) -> None:
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise IllmError(f"expected images of shape B x 3 x H x W, got {shape}")
        if not images.is_floating_point():
            raise IllmError(f"expected float images in [0, 1], got dtype {images.dtype}")
        height, width = images.shape[-2:]
        if height == 0 or width == 0 or images.shape[0] == 0:
            raise IllmError(f"cannot encode an empty batch or image: shape {tuple(images.shape)}")
        if need_multiple and (height % self.pad_multiple or width % self.pad_multiple):
            raise IllmError(
                f"forward needs height and width multiples of {self.pad_multiple}, got {height}x{width} "
                "(compress pads any size)"
            )
