"""Reading and writing images as the codec sees them: RGB, 8 bits per channel.

`read_image` accepts PNG (8 or 16 bits per channel, grayscale, palette, with or without
alpha), JPEG, WebP and the other formats Pillow reads, applies the EXIF orientation and
returns a ``uint8`` tensor ``3 x H x W``. Alpha is dropped (not composited) with a warning.
Image sizes are checked from the file header before any pixel is decoded, so a small file
that claims a huge image (a "decompression bomb") is refused without allocating it.
"""

import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from illm.errors import IllmError, one_line
from illm.fileformat import MAX_PIXELS  # one limit for images and .illm files
from illm.files import atomic_write_bytes

# The files that image folders (training data, evaluation sets, CLI folders) are made of.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm")

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_EIGHT_BIT_MODES = ("1", "L", "P", "RGB", "RGBA", "LA", "PA", "RGBa", "La", "CMYK", "YCbCr", "LAB", "HSV")


def read_image(path: str | Path) -> Tensor:
    """Read an image file as an RGB ``uint8`` tensor ``3 x H x W``.

    16-bit samples are reduced to their high byte, as Pillow does for 16-bit RGB PNGs (at most
    one level away from exact rounding). Raises `IllmError` naming the file when it is missing,
    not an image, truncated, of an unsupported pixel format, or larger than `MAX_PIXELS`.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89 megapixels and refuses from 179; MAX_PIXELS is checked below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_size(path, *image.size)
                has_alpha = image.mode in _ALPHA_MODES or "transparency" in image.info
                pixels = _rgb_array(path, ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise IllmError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise IllmError(f"{path}: is a folder, not an image") from None
    except UnidentifiedImageError:
        raise IllmError(f"{path}: not an image file (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError as error:
        raise IllmError(f"{path}: refusing to decode a decompression bomb ({one_line(error)})") from None
    except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt pixel data
        raise IllmError(f"{path}: cannot read image ({one_line(error)})") from None
    if has_alpha:
        warnings.warn(f"{path}: alpha channel dropped (the codec stores RGB only)", stacklevel=2)
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _check_size(path: Path, width: int, height: int) -> None:
    """Refuse images over MAX_PIXELS from the header's size alone, before decoding any pixel."""
    if width * height > MAX_PIXELS:
        raise IllmError(
            f"{path}: image of {width}x{height} pixels exceeds the limit of {MAX_PIXELS} pixels "
            "(decompression bomb guard)"
        )
    if width < 1 or height < 1:
        raise IllmError(f"{path}: empty image ({width}x{height})")


def _rgb_array(path: Path, image: Image.Image) -> np.ndarray:
    """H x W x 3 uint8 pixels of an opened image."""
    if image.mode in _SIXTEEN_BIT_GRAY_MODES:
        gray = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode not in _EIGHT_BIT_MODES:
        raise IllmError(
            f"{path}: {image.format} images in pixel mode {image.mode} are not supported; "
            "convert it to an 8- or 16-bit PNG"
        )
    return np.array(image.convert("RGB"))


def to_float(image: Tensor) -> Tensor:
    """``uint8`` ``3 x H x W`` (or ``1 x 3 x H x W``) -> float ``1 x 3 x H x W`` in [0, 1]."""
    if image.dtype != torch.uint8:
        raise IllmError(f"to_float expects a uint8 image, got {image.dtype}")
    image = _batched(image)
    return image.float() / 255


def to_uint8(image: Tensor) -> Tensor:
    """Float image in [0, 1] (``1 x 3 x H x W`` or ``3 x H x W``) -> ``uint8`` ``3 x H x W``,
    clamped and rounded to the nearest level."""
    image = _batched(image)
    if image.shape[0] != 1:
        raise IllmError(f"to_uint8 converts one image, got a batch of {image.shape[0]}")
    return image[0].detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


def _batched(image: Tensor) -> Tensor:
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[1] != 3:
        raise IllmError(f"expected an RGB image 3 x H x W or 1 x 3 x H x W, got shape {tuple(image.shape)}")
    return image


def save_image(path: str | Path, image: Tensor) -> None:
    """Write an image atomically; the format follows the extension (``.png`` keeps it lossless).

    ``image`` is ``uint8`` ``3 x H x W`` or float ``1 x 3 x H x W`` / ``3 x H x W`` in [0, 1].
    """
    path = Path(path)
    pixels = image.cpu() if image.dtype == torch.uint8 else to_uint8(image)
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise IllmError(f"{path}: expected a uint8 image 3 x H x W, got shape {tuple(pixels.shape)}")
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise IllmError(f"{path}: unknown image extension {path.suffix!r} (use .png)")
    buffer = BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buffer, format=image_format)
    atomic_write_bytes(path, buffer.getvalue())
