"""The framing of a ``.illm`` file, read without torch (for ``illm info``): its layout is
described in `illm.codec`, which writes and decodes the payload."""

import struct
import zlib
from dataclasses import dataclass

from illm.errors import FormatError, IllmError

MAX_PIXELS = 2**27  # 134 megapixels (e.g. 16384 x 8192): far beyond what the networks can process

# The largest image `decompress` decodes unless told otherwise: a header is 15 bytes that anyone
# can write, and decoding costs memory and time in proportion to the size it claims.
DEFAULT_MAX_PIXELS = 2**26  # 67 megapixels, e.g. 8192 x 8192

MAGIC = b"\x89I"
VERSION = 1
MAX_SIDE = 16384
WEIGHTS_ID_BYTES = 4
MAX_HEADER_BYTES = 16

HEADER = struct.Struct(">2sB4sHH")  # magic, version, weights id, height, width
CRC = struct.Struct(">I")
FRAMING_BYTES = HEADER.size + CRC.size  # 15: everything in a file but the payload
# An rANS string holds at least its final 64-bit coder state.
_MIN_PAYLOAD_BYTES = 2 * 8
_WORD_BYTES = 4  # rANS strings are made of 32-bit words


@dataclass(frozen=True)
class Header:
    """The fields of a ``.illm`` file, as `read_header` found them."""

    version: int
    weights_id: bytes
    height: int
    width: int
    header_size: int  # bytes of framing (header and CRC): the file size minus the payload
    payload_size: int
    crc: int

    @property
    def file_size(self) -> int:
        return self.header_size + self.payload_size

    @property
    def bits_per_pixel(self) -> float:
        return 8 * self.file_size / (self.height * self.width)


def read_header(data: bytes) -> Header:
    """Parse and check the framing of a ``.illm`` file (no weights needed).

    Checks magic, version, CRC, image size and payload size, in that order; raises
    `FormatError` with a one-line reason on the first that fails.
    """
    data = memoryview(data)
    if len(data) >= len(MAGIC) and data[: len(MAGIC)] != MAGIC:
        raise FormatError(
            f"not an .illm file: it starts with {bytes(data[:4]).hex()}, not the magic {MAGIC.hex()}"
        )
    if len(data) > len(MAGIC) and data[len(MAGIC)] != VERSION:
        raise FormatError(
            f"unsupported .illm format version {data[len(MAGIC)]} (this illm reads version {VERSION})"
        )
    if len(data) < FRAMING_BYTES:
        raise FormatError(
            f"truncated .illm file: {len(data)} bytes, less than its {FRAMING_BYTES}-byte framing"
        )
    magic, version, file_weights_id, height, width = HEADER.unpack_from(data)
    (stored_crc,) = CRC.unpack_from(data, len(data) - CRC.size)
    if zlib.crc32(data[: -CRC.size]) != stored_crc:
        raise FormatError("corrupted or truncated .illm file: checksum mismatch")
    check_size(height, width, FormatError)
    payload_size = len(data) - FRAMING_BYTES
    if payload_size < _MIN_PAYLOAD_BYTES:
        raise FormatError(
            f"invalid .illm file: payload of {payload_size} bytes, too short for two coded strings"
        )
    if payload_size % _WORD_BYTES:
        raise FormatError(
            f"invalid .illm file: payload of {payload_size} bytes, not a whole number of 32-bit words"
        )
    return Header(
        version=version,
        weights_id=file_weights_id,
        height=height,
        width=width,
        header_size=FRAMING_BYTES,
        payload_size=payload_size,
        crc=stored_crc,
    )


def check_max_pixels(header: Header, max_pixels: int) -> None:
    """Refuse a header that claims more than ``max_pixels`` pixels (`IllmError`, one line)."""
    if header.height * header.width > max_pixels:
        raise IllmError(
            f"the file holds a {header.height}x{header.width} image ({header.height * header.width} pixels), "
            f"more than the limit of {max_pixels} pixels (raise it with --max-pixels if you trust the file)"
        )


def check_size(height: int, width: int, error: type[IllmError]) -> None:
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE) or height * width > MAX_PIXELS:
        raise error(
            f"image size {height}x{width} is out of range: sides 1..{MAX_SIDE}, at most {MAX_PIXELS} pixels"
        )
