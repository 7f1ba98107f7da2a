"""The .illm format: round trip, exact framing size, weights identity, and every bad input."""

import copy
import struct
import zlib

import pytest
import torch
from skimage import data

from helpers.models import tiny_autoencoder
from illm import codec
from illm.errors import FormatError, IllmError, WeightsMismatchError
from illm.images import to_float
from illm.models.hific import HiFiCAutoencoder


@pytest.fixture(scope="module")
def model() -> HiFiCAutoencoder:
    return tiny_autoencoder(seed=0)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """A photo crop whose sides are not multiples of 64."""
    return to_float(torch.from_numpy(data.chelsea()[:50, :70].copy()).permute(2, 0, 1))


@pytest.fixture(scope="module")
def encoded(model, image) -> bytes:
    return codec.compress(model, image)


def forge(body: bytes) -> bytes:
    """A file with a valid CRC around arbitrary header and payload bytes."""
    return body + struct.pack(">I", zlib.crc32(body))


def test_round_trip_matches_the_model_and_costs_15_bytes(model, image, encoded):
    ((latent_string, hyper_string),) = model.compress(image)
    assert len(encoded) == codec.FRAMING_BYTES + len(latent_string) + len(hyper_string)
    assert codec.FRAMING_BYTES == 15 <= codec.MAX_HEADER_BYTES
    decoded = codec.decompress(model, encoded)
    assert decoded.shape == (1, 3, 50, 70)
    assert torch.equal(decoded, model.decompress(latent_string, hyper_string, 50, 70))


def test_compress_accepts_an_unbatched_image(model, image, encoded):
    assert codec.compress(model, image[0]) == encoded


def test_read_header(model, encoded):
    header = codec.read_header(encoded)
    assert (header.version, header.height, header.width) == (codec.VERSION, 50, 70)
    assert header.weights_id == codec.weights_id(model)
    assert header.header_size == codec.FRAMING_BYTES
    assert header.file_size == len(encoded) == header.header_size + header.payload_size
    assert header.bits_per_pixel == pytest.approx(8 * len(encoded) / (50 * 70))
    assert encoded.startswith(codec.MAGIC)


def test_weights_id_is_stable_and_follows_the_weights(model):
    identity = codec.weights_id(model)
    assert isinstance(identity, bytes) and len(identity) == codec.WEIGHTS_ID_BYTES
    assert codec.weights_id(copy.deepcopy(model)) == identity
    assert codec.weights_id(HiFiCAutoencoder.from_state_dict(model.state_dict())) == identity
    assert codec.weights_id(tiny_autoencoder(seed=1)) != identity

    changed = copy.deepcopy(model)
    changed.decoder.blocks[-1].bias.data[0] += 1e-3  # through .data: invisible to version counters
    assert codec.weights_id(changed) != identity

    rebuilt = copy.deepcopy(model)
    rebuilt.hyper_bottleneck._quantized_cdf[0, 1] += 1  # coder tables are part of the identity
    assert codec.weights_id(rebuilt) != identity


def test_precomputed_model_id(model, image, encoded):
    identity = codec.weights_id(model)
    assert codec.compress(model, image, model_id=identity) == encoded
    assert torch.equal(codec.decompress(model, encoded, model_id=identity), codec.decompress(model, encoded))
    with pytest.raises(IllmError, match="model_id"):
        codec.compress(model, image, model_id=b"\x00")


def test_other_weights_are_refused(encoded):
    with pytest.raises(WeightsMismatchError, match="compressed with weights [0-9a-f]{8}.*[0-9a-f]{8}"):
        codec.decompress(tiny_autoencoder(seed=1), encoded)


def test_every_single_byte_corruption_is_detected(model, encoded):
    for position in range(len(encoded)):
        corrupted = bytearray(encoded)
        corrupted[position] ^= 0x10
        with pytest.raises(FormatError):
            codec.decompress(model, bytes(corrupted))


def test_flipped_payload_byte_is_a_checksum_error(model, encoded):
    corrupted = bytearray(encoded)
    corrupted[len(encoded) // 2] ^= 0xFF
    with pytest.raises(FormatError, match="checksum"):
        codec.decompress(model, bytes(corrupted))


@pytest.mark.parametrize("length", [0, 1, 2, 3, 10, 14, 15, 40, -4, -1])
def test_truncated_files_are_refused(model, encoded, length):
    with pytest.raises(FormatError, match="truncated"):
        codec.decompress(model, encoded[:length])


def test_wrong_magic(model, encoded):
    with pytest.raises(FormatError, match="not an .illm file"):
        codec.read_header(b"\x89PNG\r\n\x1a\n" + encoded[8:])


def test_unknown_version(model, encoded):
    future = bytearray(encoded)
    future[2] = 2
    with pytest.raises(FormatError, match="version 2"):
        codec.decompress(model, forge(bytes(future[:-4])))


@pytest.mark.parametrize(
    "height, width",
    [(0, 70), (50, 0), (codec.MAX_SIDE + 1, 70), (65535, 65535), (codec.MAX_SIDE, codec.MAX_SIDE)],
)
def test_absurd_image_sizes_are_refused_before_decoding(model, encoded, height, width):
    forged = encoded[:7] + struct.pack(">HH", height, width) + encoded[11:-4]
    with pytest.raises(FormatError, match="out of range"):
        codec.decompress(model, forge(forged))


def test_payload_too_short_for_two_strings(model, encoded):
    with pytest.raises(FormatError, match="too short"):
        codec.decompress(model, forge(encoded[:11] + b"\x00" * 10))


def test_compress_rejects_bad_shapes(model):
    with pytest.raises(IllmError, match="1 x 3 x H x W"):
        codec.compress(model, torch.zeros(2, 3, 8, 8))
    with pytest.raises(IllmError, match="1 x 3 x H x W"):
        codec.compress(model, torch.zeros(1, 4, 8, 8))


def test_headers_over_max_pixels_are_refused_before_decoding(model, encoded):
    forged = forge(encoded[:7] + struct.pack(">HH", 9000, 9000) + encoded[11:-4])
    with pytest.raises(IllmError, match="more than the limit of 67108864 pixels"):
        codec.decompress(model, forged)
    with pytest.raises(FormatError, match="too short for a 9000x9000 image"):
        codec.decompress(model, forged, max_pixels=2**27)


def test_payload_far_too_short_for_the_size(model, encoded):
    minimum = model.minimum_payload_bytes(2000, 2000)
    assert len(encoded) - codec.FRAMING_BYTES < minimum
    with pytest.raises(FormatError, match=f"at least {minimum}"):
        codec.decompress(model, forge(encoded[:7] + struct.pack(">HH", 2000, 2000) + encoded[11:-4]))


def test_payload_of_partial_words(model, encoded):
    with pytest.raises(FormatError, match="not a whole number of 32-bit words"):
        codec.decompress(model, forge(encoded[:-4] + b"\x00\x00"))


def test_cli_refuses_a_huge_header_before_loading_weights(encoded, tmp_path, capsys):
    from illm.cli import main

    path = tmp_path / "huge.illm"
    path.write_bytes(forge(encoded[:7] + struct.pack(">HH", 16384, 8192) + encoded[11:-4]))
    assert main(["decompress", "--weights", str(tmp_path / "no-such-weights.pt"), str(path)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "16384x8192 image" in error and "--max-pixels" in error
    assert main(["decompress", "--weights", "x", "--tile", "100", str(path)]) == 1
    assert "multiple of 16" in capsys.readouterr().err
