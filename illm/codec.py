"""The ``.illm`` file format: one compressed image, 15 bytes of framing around the payload.

Layout of format version 1 (all integers big-endian)::

    offset  size  field
    0       2     magic: 0x89 0x49 ("\\x89I"; the high first byte keeps text files out)
    2       1     format version: 1
    3       4     weights id: the first 4 bytes of a SHA-256 of the autoencoder's state dict
    7       2     image height in pixels, 1..MAX_SIDE
    9       2     image width in pixels, 1..MAX_SIDE
    11      n     payload: the latent string, then the hyper string with its bytes reversed
    11 + n  4     CRC-32 (zlib's) of bytes 0 .. 11 + n - 1

The file is ``n + 15`` bytes long. The two strings need no length fields: compressai's rANS
decoder reads its string from the front and stops after the last symbol it was asked for,
ignoring whatever follows. The latent string is decoded from the payload as it is, the hyper
string from the payload reversed (which starts with the hyper string in its original order).

A reader checks, before decoding anything: the magic, the version, the CRC (corruption and
truncation), the image size (bounded by `MAX_SIDE` and `illm.images.MAX_PIXELS`) and that the
payload is whole 32-bit words; then `decompress` checks the weights id (decoding with other
weights is an error rather than a garbage image), the image size against its ``max_pixels``
(`DEFAULT_MAX_PIXELS`: the work and memory a header may ask for) and the payload against the
fewest bytes that any valid file of that size takes (`HiFiCAutoencoder.minimum_payload_bytes`).

The CRC guards against accidents, not forgery. A payload crafted with a matching CRC is decoded
by `illm.rans`, which never reads outside it and does at most 10 coder steps per symbol: any
byte string either decodes to some image of the header's size or raises `FormatError`.
"""

import hashlib
import zlib

import torch
from torch import Tensor, nn

from illm.errors import FormatError, IllmError, WeightsMismatchError

# The framing is read without torch (`illm info`); these names are part of this module's API too.
from illm.fileformat import CRC as _CRC
from illm.fileformat import (  # noqa: F401
    DEFAULT_MAX_PIXELS,
    FRAMING_BYTES,
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_SIDE,
    VERSION,
    WEIGHTS_ID_BYTES,
    Header,
    check_max_pixels,
    read_header,
)
from illm.fileformat import HEADER as _HEADER
from illm.fileformat import check_size as _check_size


def weights_id(model: nn.Module) -> bytes:
    """A 4-byte identity of ``model``'s weights: SHA-256 over its state dict (names, dtypes,
    shapes and bytes of every parameter and buffer, coder tables included), truncated.

    Computed from CPU bytes, so it is the same on any device. It costs one pass over the
    weights (about 1 s for the full-size autoencoder on a CPU core): compute it once and pass
    it to `compress`/`decompress` when coding many images with the same weights
    (`illm.zoo.load_for_coding` returns it, remembered per weights file).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.digest()[:WEIGHTS_ID_BYTES]


def compress(
    model: nn.Module, image: Tensor, *, model_id: bytes | None = None, tile: int | None = None
) -> bytes:
    """Compress one image (float ``1 x 3 x H x W`` or ``3 x H x W`` in [0, 1]) into the
    complete bytes of a ``.illm`` file.

    ``model`` is a `HiFiCAutoencoder` with built coder tables (as `illm.zoo.load` returns it);
    ``model_id`` is ``weights_id(model)``, computed here when not given. ``tile``: see
    `illm.tiling.resolve_tile` (None: tiles for large images).
    """
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[:2] != (1, 3):
        raise IllmError(f"compress takes one RGB image 1 x 3 x H x W, got shape {tuple(image.shape)}")
    height, width = image.shape[-2:]
    _check_size(height, width, IllmError)
    model_id = _checked_id(model, model_id)
    ((latent_string, hyper_string),) = model.compress(image, tile=tile)
    header = _HEADER.pack(MAGIC, VERSION, model_id, height, width)
    body = header + latent_string + hyper_string[::-1]
    return body + _CRC.pack(zlib.crc32(body))


def decompress(
    model: nn.Module,
    data: bytes,
    *,
    model_id: bytes | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    tile: int | None = None,
) -> Tensor:
    """Decode the bytes of a ``.illm`` file into a float ``1 x 3 x H x W`` image in [0, 1].

    Raises `FormatError` for anything but an intact ``.illm`` file of a known version (forged
    ones included: see the module's docstring), `WeightsMismatchError` when it was made with
    other weights than ``model``'s, and `IllmError` when its header asks for more than
    ``max_pixels`` pixels. ``tile``: see `illm.tiling.resolve_tile`.
    """
    header = read_header(data)
    check_max_pixels(header, max_pixels)
    model_id = _checked_id(model, model_id)
    if header.weights_id != model_id:
        raise WeightsMismatchError(
            f"the file was compressed with weights {header.weights_id.hex()}, "
            f"but the weights given for decoding are {model_id.hex()}"
        )
    minimum = model.minimum_payload_bytes(header.height, header.width)
    if header.payload_size < minimum:
        raise FormatError(
            f"invalid .illm file: a payload of {header.payload_size} bytes is too short for a "
            f"{header.height}x{header.width} image (any valid one takes at least {minimum})"
        )
    payload = bytes(data[_HEADER.size : -_CRC.size])
    return model.decompress(payload, payload[::-1], header.height, header.width, tile=tile)


def _checked_id(model: nn.Module, model_id: bytes | None) -> bytes:
    if model_id is None:
        if any(parameter.dtype != torch.float32 for parameter in model.parameters()):
            # the id is that of the float32 weights, which a bf16 model no longer holds
            raise IllmError(
                "a model with bf16 networks cannot compute its weights id: pass model_id "
                "(illm.zoo.load_for_coding returns it with the model)"
            )
        return weights_id(model)
    if not isinstance(model_id, bytes) or len(model_id) != WEIGHTS_ID_BYTES:
        raise IllmError(
            f"model_id must be the {WEIGHTS_ID_BYTES} bytes of weights_id(model), got {model_id!r}"
        )
    return model_id
