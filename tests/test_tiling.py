"""Tiled coding: the halos cover the receptive fields, and tiles give what the whole image gives."""

import pytest
import torch

from illm import codec, tiling
from illm.errors import IllmError
from illm.models.hific import HiFiCAutoencoder

# The official depth (9 residual blocks) at tiny widths: receptive fields depend on depth only.
DEEP_TINY = dict(
    latent_channels=8, hyper_channels=8, encoder_channels=(8, 8, 16, 16, 16), num_residual_blocks=9
)


@pytest.fixture(scope="module")
def model() -> HiFiCAutoencoder:
    torch.manual_seed(0)
    model = HiFiCAutoencoder(**DEEP_TINY).eval()
    model.update(force=True)
    return model


def support(function, shape: tuple[int, ...], out_row: slice) -> tuple[int, int]:
    """First and last input rows whose values reach output rows ``out_row`` (by the gradient)."""
    torch.manual_seed(1)
    x = torch.rand(shape, dtype=torch.float64, requires_grad=True)
    function(x)[..., out_row, :].sum().backward()
    rows = x.grad.abs().sum(dim=(0, 1, 3)).nonzero().flatten()
    return rows.min().item(), rows.max().item()


def test_encoder_receptive_field_is_34_pixels_within_the_halo(model):
    encoder = model.encoder.double()
    try:
        first, last = support(encoder, (1, 3, 320, 32), slice(10, 11))  # latent row 10: pixels 160..175
    finally:
        model.encoder.float()
    assert (first, last) == (160 - 34, 160 + 34)
    stride = tiling.LATENT_STRIDE
    assert 160 - tiling.ENCODER_HALO * stride <= first and last < 160 + (1 + tiling.ENCODER_HALO) * stride
    assert first < 160 - (tiling.ENCODER_HALO - 1) * stride  # one latent pixel less would not do


def test_generator_receptive_fields_are_within_the_halos(model):
    generator = model.decoder.double()
    try:
        trunk_first, trunk_last = support(generator.trunk, (1, 8, 60, 3), slice(30, 31))
        head_first, head_last = support(generator.head, (1, 16, 12, 3), slice(6 * 16, 7 * 16))
    finally:
        model.decoder.float()
    halo = tiling.trunk_halo(generator)
    assert halo == 19
    assert (trunk_first, trunk_last) == (30 - halo, 30 + halo)
    # output pixels 96..111 (latent core 6..6) need latent pixels 5..7 + 1
    assert (head_first, head_last) == (6 - 1, 7 + 1)
    assert 6 - tiling.HEAD_HALO <= head_first and head_last < 7 + tiling.HEAD_HALO


def test_tiled_latent_and_strings_match_untiled(model):
    torch.manual_seed(2)
    image = torch.rand(1, 3, 200, 300)
    padded = torch.nn.functional.pad(image, (0, 20, 0, 56), mode="reflect")
    whole = tiling.encode(model.encoder, padded, None)
    tiled = tiling.encode(model.encoder, padded, 48)  # 3 x 3 latent-pixel cores: many tiles
    assert (whole - tiled).abs().max() < 1e-5
    assert model.compress(image, tile=0) == model.compress(image, tile=48)


def test_tiled_decoding_matches_untiled_within_1_over_255(model):
    torch.manual_seed(3)
    image = torch.rand(1, 3, 150, 250)
    encoded = codec.compress(model, image, tile=0)
    whole = codec.decompress(model, encoded, tile=0)
    tiled = codec.decompress(model, encoded, tile=32)
    assert whole.shape == tiled.shape == (1, 3, 150, 250)
    assert (whole - tiled).abs().max() < 1 / 255


def test_tiles_need_their_halo(model, monkeypatch):
    """Without it, tile edges show (the gradient test above finds the exact extent)."""
    torch.manual_seed(4)
    latent = torch.randn(1, 8, 2, 64)  # wider than a trunk tile (4) and two halos
    with torch.no_grad():
        whole = tiling.generate(model.decoder, latent, None)
        assert (whole - tiling.generate(model.decoder, latent, 16)).abs().max() < 1e-5
        monkeypatch.setattr(tiling, "trunk_halo", lambda generator: 2)
        short = tiling.generate(model.decoder, latent, 16)
    assert (whole - short).abs().max() > 1e-4


def test_resolve_tile():
    assert tiling.resolve_tile(None, 1000, 1000) is None
    assert tiling.resolve_tile(None, 4000, 3000) == tiling.DEFAULT_TILE
    assert tiling.resolve_tile(0, 4000, 3000) is None
    assert tiling.resolve_tile(512, 10, 10) == 512
    for bad in (-16, 100, True, 1.5):
        with pytest.raises(IllmError, match="multiple of 16"):
            tiling.resolve_tile(bad, 10, 10)
