"""Run the encoder and the generator tile by tile, so that memory follows the tile, not the image.

A tile is cut with a halo at least as wide as the network's receptive field, the network runs on
the crop, and only the tile's core is kept. Zero padding at a crop's edge then never reaches the
core, and the core is what the whole image would have given (up to float rounding: convolution
algorithms sum in shape-dependent orders). Tiles are aligned to the latent grid (16 pixels), so
stride-2 convolutions sample the same pixels as on the whole image. All sizes below are in
latent pixels; one latent pixel is 16 image pixels.

Receptive fields, worked out layer by layer from `illm.models.hific` (tests/test_tiling.py
measures them by perturbing inputs):

- Encoder: latent pixel j depends on image pixels 16j - 34 .. 16j + 34: the last 3x3 conv
  reaches latent j +- 1; each stride-2 3x3 conv maps output o to input 2o - 1 .. 2o + 1, so four
  of them give 16j - 31 .. 16j + 31; the first 7x7 conv adds 3. A core [r0, r1) therefore needs
  latent rows r0 - 3 .. r1 + 1 (16 (r0 - 3) <= 16 r0 - 34 and 16 (r1 + 2) > 16 (r1 - 1) + 34):
  `ENCODER_HALO` = 3.
- Generator trunk (a norm, a 3x3 conv, B residual blocks of two 3x3 convs, all at latent
  resolution; norms are per pixel): 1 + 2B latent pixels, 19 for the official B = 9.
- Generator head (four stride-2 3x3 transposed convs, padding 1, output padding 1, then a 7x7
  conv): output o of such a transposed conv depends on inputs o // 2 .. (o + 1) // 2, so output
  pixels 16 r0 .. 16 r1 - 1, widened by 3 for the 7x7 conv, depend on latent pixels r0 - 1 ..
  r1 + 1: `HEAD_HALO` = 2.

The generator runs in two passes: the trunk, nine tenths of its arithmetic but at latent
resolution where activations are small, in large tiles (little halo overhead), kept whole at
latent resolution (its channels are 15 bytes per image pixel in float32); then the head, whose
full-resolution activations dominate memory (~1 kB per pixel), in small tiles with a 2-pixel halo.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from illm.errors import IllmError

if TYPE_CHECKING:  # torch is imported where a network runs: `illm --help` reads the constants below
    from torch import Tensor, nn

LATENT_STRIDE = 16
ENCODER_HALO = 3
HEAD_HALO = 2
TRUNK_TILE_FACTOR = 4  # the trunk's tiles are this many times wider than the other stages'

DEFAULT_TILE = 1024  # pixels: the side of a tile's core, for the full-resolution stages
# Images above this many pixels are coded in tiles unless a tile size is given. Untiled decoding
# takes about 1.2 GB per megapixel above the weights (scripts/benchmark_tiling.py, README), so
# this keeps an untiled run under about 5 GB.
TILE_ABOVE_PIXELS = 4 * 2**20


def resolve_tile(tile: int | None, height: int, width: int) -> int | None:
    """The tile side in pixels to code an image of ``height`` x ``width`` with, or None for the
    whole image at once. ``tile`` None means automatic (tiles above `TILE_ABOVE_PIXELS`), 0
    means never tile; others must be positive multiples of 16."""
    if tile is None:
        return DEFAULT_TILE if height * width > TILE_ABOVE_PIXELS else None
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 0 or tile % LATENT_STRIDE:
        raise IllmError(
            f"tile must be 0 (no tiling) or a positive multiple of {LATENT_STRIDE} pixels, got {tile!r}"
        )
    return tile or None


def trunk_halo(generator: nn.Module) -> int:
    return 1 + 2 * len(generator.resid_blocks)


def encode(encoder: nn.Module, images: Tensor, tile: int | None) -> Tensor:
    """``encoder(images)`` as float32 on the CPU, computed in tiles of ``tile`` pixels (None: whole).

    ``images`` (B x 3 x H x W, sides multiples of 16) may live anywhere; each crop moves to the
    device and dtype of the encoder's weights.
    """
    return _tiled(
        _on_weights_of(encoder, encoder), images, _latent_tile(tile), ENCODER_HALO, LATENT_STRIDE, 1
    )


def generate(generator: nn.Module, latent: Tensor, tile: int | None) -> Tensor:
    """``generator(latent)`` as float32 on the CPU, the trunk and the head each in tiles."""
    core = _latent_tile(tile)
    trunk_tile = None if core is None else TRUNK_TILE_FACTOR * core
    features = _tiled(
        _on_weights_of(generator, generator.trunk), latent, trunk_tile, trunk_halo(generator), 1, 1
    )
    return _tiled(_on_weights_of(generator, generator.head), features, core, HEAD_HALO, 1, LATENT_STRIDE)


def _latent_tile(tile: int | None) -> int | None:
    return None if tile is None else max(1, tile // LATENT_STRIDE)


def _on_weights_of(network: nn.Module, function: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    import torch

    weight = next(network.parameters())

    def run(x: Tensor) -> Tensor:
        return function(x.to(weight.device, weight.dtype)).to("cpu", torch.float32)

    return run


def _tiled(
    function: Callable[[Tensor], Tensor],
    x: Tensor,
    tile: int | None,
    halo: int,
    in_scale: int,
    out_scale: int,
) -> Tensor:
    """``function`` over tiles of ``x``, on a grid of latent pixels that are ``in_scale`` pixels
    of ``x`` and ``out_scale`` pixels of the output; each tile's crop has ``halo`` more a side."""
    height, width = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    if tile is None:
        return function(x)
    out = None
    for row, row_end, crop_row, crop_row_end in _spans(height, tile, halo):
        for col, col_end, crop_col, crop_col_end in _spans(width, tile, halo):
            crop = x[
                ...,
                crop_row * in_scale : crop_row_end * in_scale,
                crop_col * in_scale : crop_col_end * in_scale,
            ]
            y = function(crop)
            y = y[
                ...,
                (row - crop_row) * out_scale : (row_end - crop_row) * out_scale,
                (col - crop_col) * out_scale : (col_end - crop_col) * out_scale,
            ]
            if out is None:
                out = y.new_empty(*y.shape[:2], height * out_scale, width * out_scale)
            out[..., row * out_scale : row_end * out_scale, col * out_scale : col_end * out_scale] = y
    return out


def _spans(size: int, tile: int, halo: int) -> Iterator[tuple[int, int, int, int]]:
    """(core start, core end, crop start, crop end) of each tile along an axis of ``size``."""
    for start in range(0, size, tile):
        end = min(size, start + tile)
        yield start, end, max(0, start - halo), min(size, end + halo)
