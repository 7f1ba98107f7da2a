"""Image reading and writing: formats, bit depths, alpha, orientation, bad files, atomic writes."""

import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from illm import images
from illm.errors import IllmError


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.ascontiguousarray(data.chelsea()[:48, :64])  # H x W x 3 uint8


def write_png(
    path, pixels: np.ndarray, bit_depth: int = 8, width: int | None = None, height: int | None = None
):
    """A minimal PNG writer: Pillow cannot write 16-bit RGB, and a forged header is needed too."""
    rows, columns, channels = pixels.shape
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    sample = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + pixels[row].astype(sample).tobytes() for row in range(rows))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", width or columns, height or rows, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def as_hwc(image: torch.Tensor) -> np.ndarray:
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
    return image.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("suffix", [".png", ".webp", ".bmp"])
def test_lossless_formats_read_back_exactly(tmp_path, photo, suffix):
    path = tmp_path / f"photo{suffix}"
    Image.fromarray(photo).save(path, lossless=True) if suffix == ".webp" else Image.fromarray(photo).save(
        path
    )
    np.testing.assert_array_equal(as_hwc(images.read_image(path)), photo)


def test_jpeg_reads_as_rgb(tmp_path, photo):
    path = tmp_path / "photo.jpg"
    Image.fromarray(photo).save(path, quality=95)
    image = as_hwc(images.read_image(path))
    assert image.shape == photo.shape
    assert np.abs(image.astype(int) - photo).mean() < 3


@pytest.mark.parametrize("channels", [3, 4, 1])
def test_16_bit_png_keeps_the_high_byte(tmp_path, channels):
    levels = np.arange(4 * 5 * channels).reshape(4, 5, channels) * 1093 + 5  # spans most of 0..65535
    write_png(tmp_path / "deep.png", levels, bit_depth=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the alpha warning, tested elsewhere
        image = as_hwc(images.read_image(tmp_path / "deep.png"))
    expected = (levels >> 8).astype(np.uint8)
    np.testing.assert_array_equal(
        image, expected[:, :, :3] if channels > 1 else np.repeat(expected, 3, axis=2)
    )


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_grayscale_becomes_three_equal_channels(tmp_path, photo, suffix):
    gray = Image.fromarray(photo).convert("L")
    gray.save(tmp_path / f"gray{suffix}")
    image = as_hwc(images.read_image(tmp_path / f"gray{suffix}"))
    assert image.shape == photo.shape
    assert (image == image[:, :, :1]).all()
    if suffix == ".png":
        np.testing.assert_array_equal(image[:, :, 0], np.asarray(gray))


def test_palette_png(tmp_path, photo):
    palette = Image.fromarray(photo).convert("P")
    palette.save(tmp_path / "palette.png")
    expected = np.asarray(palette.convert("RGB"))
    np.testing.assert_array_equal(as_hwc(images.read_image(tmp_path / "palette.png")), expected)


@pytest.mark.parametrize("suffix", [".png", ".webp"])
def test_alpha_is_dropped_with_a_warning(tmp_path, photo, suffix):
    rgba = np.concatenate([photo, np.full(photo.shape[:2] + (1,), 7, np.uint8)], axis=2)  # nearly transparent
    path = tmp_path / f"rgba{suffix}"
    Image.fromarray(rgba).save(path, lossless=True) if suffix == ".webp" else Image.fromarray(rgba).save(path)
    with pytest.warns(UserWarning, match=r"rgba.*alpha channel dropped"):
        image = images.read_image(path)
    np.testing.assert_array_equal(as_hwc(image), photo)  # dropped, not composited on a background


def test_exif_orientation_is_applied(tmp_path, photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(photo).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    assert images.read_image(tmp_path / "rotated.jpg").shape == (3, photo.shape[1], photo.shape[0])


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("notes.png", b"just some text", "not an image file"),
        ("empty.jpg", b"", "not an image file"),
        ("cut.png", None, "cannot read image"),
    ],
)
def test_unreadable_files_give_a_one_line_error_naming_the_file(tmp_path, photo, name, content, message):
    path = tmp_path / name
    if content is None:  # a real PNG cut in the middle of its pixel data
        Image.fromarray(photo).save(path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(content)
    with pytest.raises(IllmError, match=message) as error:
        images.read_image(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(IllmError, match="no such file"):
        images.read_image(tmp_path / "absent.png")
    with pytest.raises(IllmError, match="folder"):
        images.read_image(tmp_path)


@pytest.mark.parametrize("side", [12_000, 20_000])  # over MAX_PIXELS; 20000^2 is also over Pillow's own limit
def test_decompression_bomb_is_refused_before_decoding(tmp_path, side):
    path = tmp_path / "bomb.png"
    write_png(path, np.zeros((1, 1, 3), np.uint8), width=side, height=side)  # header claims side x side
    with pytest.raises(IllmError, match="decompression bomb"):
        images.read_image(path)


def test_to_float_and_to_uint8_round_trip():
    pixels = torch.arange(256, dtype=torch.uint8).repeat(3, 2, 1)  # 3 x 2 x 256, every level
    floats = images.to_float(pixels)
    assert floats.shape == (1, 3, 2, 256) and floats.dtype == torch.float32
    assert torch.equal(images.to_uint8(floats), pixels)


def test_to_uint8_rounds_and_clamps():
    values = (
        torch.tensor([-0.2, 0.0, 0.4 / 255, 0.6 / 255, 254.6 / 255, 1.3]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    )
    assert images.to_uint8(values)[0, 0].tolist() == [0, 0, 0, 1, 255, 255]


def test_shape_errors():
    with pytest.raises(IllmError, match="uint8"):
        images.to_float(torch.zeros(3, 4, 4))
    with pytest.raises(IllmError, match="shape"):
        images.to_uint8(torch.zeros(1, 4, 4, 4))


def test_save_image_writes_png_atomically(tmp_path, photo):
    pixels = torch.from_numpy(photo).permute(2, 0, 1)
    target = tmp_path / "out.png"
    target.write_bytes(b"old content")
    images.save_image(target, pixels)
    images.save_image(tmp_path / "from_float.png", images.to_float(pixels))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["from_float.png", "out.png"]  # no temp files
    assert torch.equal(images.read_image(target), pixels)
    assert torch.equal(images.read_image(tmp_path / "from_float.png"), pixels)


def test_save_image_rejects_unknown_extension(tmp_path):
    with pytest.raises(IllmError, match="extension"):
        images.save_image(tmp_path / "out.xyz", torch.zeros(3, 2, 2, dtype=torch.uint8))
    assert not list(tmp_path.iterdir())
