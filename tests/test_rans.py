"""The checked rANS decoder: compressai's symbols for compressai's strings, errors for the rest."""

import pytest
import torch

from helpers.models import tiny_autoencoder
from illm import rans
from illm.errors import FormatError


@pytest.fixture(scope="module")
def coder():
    return tiny_autoencoder(seed=0).latent_bottleneck


def coded(coder, scale: float, seed: int = 0):
    """A latent string with values up to ``scale`` (large ones escape), its indexes and means."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, 8, 16, 16, generator=generator) * scale
    latent[0, 0, 0, :3] = torch.tensor([2**27 - 100, -(2**27) + 100, 0.0])  # 7-nibble escapes
    means = torch.randn(1, 8, 16, 16, generator=generator)
    indexes = coder.build_indexes(torch.rand(1, 8, 16, 16, generator=generator) * 3)
    (string,) = coder.compress(latent, indexes, means=means)
    return string, indexes, means


@pytest.mark.parametrize("scale", [0.5, 30.0, 1e4, 1e7])
def test_matches_compressai(coder, scale):
    string, indexes, means = coded(coder, scale)
    expected = coder.decompress([string], indexes, means=means)
    symbols = rans.decode(string, indexes, rans.CoderTables(coder))
    assert torch.equal(coder.dequantize(symbols, means), expected)


def test_every_truncation_is_an_error_and_trailing_bytes_are_ignored(coder):
    string, indexes, _ = coded(coder, 30.0)
    tables = rans.CoderTables(coder)
    full = rans.decode(string, indexes, tables)
    assert torch.equal(rans.decode(string + b"\xff" * 64, indexes, tables), full)
    for length in range(0, len(string), 4):
        with pytest.raises(FormatError):
            rans.decode(string[:length], indexes, tables)


def test_escape_runs_of_15_are_refused(coder):
    _, indexes, _ = coded(coder, 1.0)
    with pytest.raises(FormatError, match="escape announces 15 nibbles"):
        rans.decode(b"\xff" * 4096, indexes, rans.CoderTables(coder))


def test_minimum_string_bytes():
    assert rans.minimum_string_bytes(0.0) == 8
    assert rans.minimum_string_bytes(33.0) == 8
    assert rans.minimum_string_bytes(34.0) == 12
    assert rans.minimum_string_bytes(33.0 + 32 * 10) == 8 + 40


def test_the_cheapest_strings_meet_the_bound(coder):
    """Half a million of the cheapest symbol there is: the string is as short as the bound allows."""
    tables = rans.CoderTables(coder)
    cheapest = min(range(len(tables.cdfs)), key=lambda index: tables.minimum_bits()[index])
    indexes = torch.full((1, 8, 256, 256), cheapest, dtype=torch.int32)
    zeros = torch.zeros(1, 8, 256, 256)
    (string,) = coder.compress(zeros, indexes, means=zeros)
    bound = rans.minimum_string_bytes(indexes.numel() * tables.minimum_bits()[cheapest])
    assert bound <= len(string) <= bound + 8
