"""A bounds-checked decoder for the rANS strings of compressai's entropy models.

compressai's C++ `RansDecoder` trusts its input. Reading its `decode_with_indexes` (compressai
1.2.8, `cpp_exts/rans/rans_interface.cpp`, with ryg_rans's `rans64.h`) shows three ways in which
a crafted string makes it misbehave:

- it never compares its read pointer with the end of the string: each symbol renormalises with
  at most one 32-bit read, each escape ("bypass") nibble with at most one more;
- the escape length is a run of 4-bit nibbles that continues while a nibble is 15, so a string
  of 0xff bytes keeps it reading, past the end of the string, until it reaches unmapped memory
  (SIGSEGV) or bytes that happen to stop it (bytes of the heap then become image content);
- the escape's raw value is assembled with ``val << (4 * j)`` for an unbounded ``j``.

A static bound on how far past the end it can read does exist once the string is padded with
zeros (a zero word ends any run of 15s): about 15 words per payload word for escape runs that
the payload itself spells, plus up to ~20 words for *each* symbol decoded after the pointer has
left the payload, because an escape there can still spell up to 9 nibbles of 15 from the state
and then read 135 nibbles of raw value. That is O(symbols) of padding (hundreds of megabytes
for a few megapixels, copied once more into a std::string by pybind), so padding is no fix for
large images. This module decodes instead, with the same arithmetic and the same output as
compressai's decoder for every string its encoder writes, and checks every read:

- a read past the end of the string is a `FormatError` (a valid string ends exactly where its
  decoder stops: each renormalisation read pairs with one write of the encoder);
- an escape announces at most 8 raw nibbles: compressai's encoder writes the count of nibbles
  of a 32-bit value (0..8) as a single nibble, never a run of 15s, so a larger count is a
  `FormatError`. Each symbol is then at most 1 + 1 + 8 coder steps.

Decoding is a Python loop, so about 1 us per symbol (1.7 M latent symbols for a 2 MP image);
encoding stays with compressai (its input is ours, not an attacker's).
"""

from __future__ import annotations

import math
from bisect import bisect_right

import numpy as np
import torch
from torch import Tensor

from illm.errors import FormatError

PRECISION = 16  # compressai's probability precision: cdfs sum to 2**16
_MASK = (1 << PRECISION) - 1
_STATE_LOW = 1 << 31  # RANS64_L: the decoder's state stays at or above this after renormalising
_BYPASS_BITS = 4
_MAX_BYPASS_NIBBLES = 8  # a 32-bit raw value needs at most 8 nibbles
_CHUNK = 1 << 18  # symbols per Python list, so that the lists' memory stays bounded


class CoderTables:
    """An entropy model's quantized cdfs as Python lists, for `decode`."""

    def __init__(self, entropy_model):
        lengths = entropy_model._cdf_length.reshape(-1).int().tolist()
        cdfs = entropy_model._quantized_cdf.int().tolist()
        self.cdfs = [cdf[:length] for cdf, length in zip(cdfs, lengths)]
        self.escapes = [length - 2 for length in lengths]
        self.offsets = entropy_model._offset.reshape(-1).int().tolist()

    def minimum_bits(self) -> list[float]:
        """For each cdf, the fewest bits that coding one of its symbols can cost: that of its most
        probable symbol, less the 2**-15 share that rANS's integer rounding can save (see
        `minimum_string_bytes`)."""
        return [
            (1 - 2.0**-15) * (PRECISION - math.log2(max(b - a for a, b in zip(cdf[:-1], cdf[1:]))))
            for cdf in self.cdfs
        ]


def minimum_string_bytes(bits: float) -> int:
    """The fewest bytes of an rANS string whose symbols cost at least ``bits`` in total.

    The encoder starts from the state 2**31, each symbol of frequency f multiplies the state by at
    least (2**16 / f) * (1 - 2**-15) (floor division loses at most (2**16 - f) / 2**31 of it), every
    32-bit word written divides it by 2**32, and the final state (< 2**64) is written as 2 words.
    """
    words = max(0, math.ceil((bits + 31 - 64) / 32))
    return 4 * (words + 2)


def decode(string: bytes, indexes: Tensor, tables: CoderTables) -> Tensor:
    """The symbols (int32, the shape of ``indexes``) that ``string`` codes with the cdfs
    ``indexes`` select: what compressai's `decode_with_indexes` returns for a valid string.

    Raises `FormatError` when the string ends before its last symbol or holds an escape that
    compressai's encoder never writes. Trailing bytes after the last symbol are ignored.
    """
    words = np.frombuffer(string, dtype="<u4", count=len(string) // 4).tolist()
    if len(words) < 2:
        raise FormatError(f"invalid .illm file: a coded string of {len(string)} bytes holds no coder state")
    reader = _Reader(words)
    flat = indexes.reshape(-1)
    symbols = torch.empty(flat.numel(), dtype=torch.int32)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK].tolist()
        symbols[start : start + len(chunk)] = torch.tensor(reader.decode(chunk, tables), dtype=torch.int32)
    return symbols.reshape(indexes.shape)


class _Reader:
    """The coder state and the read position in a string's 32-bit words."""

    def __init__(self, words: list[int]):
        self.words = words
        self.state = words[0] | (words[1] << 32)
        self.position = 2

    def decode(self, indexes: list[int], tables: CoderTables) -> list[int]:
        cdfs, escapes, offsets = tables.cdfs, tables.escapes, tables.offsets
        words, end = self.words, len(self.words)
        state, position = self.state, self.position
        out = [0] * len(indexes)
        for i, index in enumerate(indexes):
            cdf = cdfs[index]
            cumulative = state & _MASK
            symbol = bisect_right(cdf, cumulative) - 1
            start = cdf[symbol]
            state = (cdf[symbol + 1] - start) * (state >> PRECISION) + cumulative - start
            if state < _STATE_LOW:
                if position == end:
                    raise _truncated()
                state = (state << 32) | words[position]
                position += 1
            if symbol == escapes[index]:
                self.state, self.position = state, position
                symbol = self._escaped_value(symbol)
                state, position = self.state, self.position
            out[i] = _int32(symbol + offsets[index])
        self.state, self.position = state, position
        return out

    def _escaped_value(self, escape: int) -> int:
        """The value after an escape symbol, as compressai's decoder assembles it (int32)."""
        count = self._nibble()
        if count > _MAX_BYPASS_NIBBLES:
            raise FormatError(
                f"invalid .illm file: an escape announces {count} nibbles (at most 8 are valid)"
            )
        raw = 0
        for j in range(count):
            raw |= self._nibble() << (_BYPASS_BITS * j)
        raw = _int32(raw)
        value = raw >> 1
        return -value - 1 if raw & 1 else value + escape

    def _nibble(self) -> int:
        state = self.state
        value = state & ((1 << _BYPASS_BITS) - 1)
        state >>= _BYPASS_BITS
        if state < _STATE_LOW:
            if self.position == len(self.words):
                raise _truncated()
            state = (state << 32) | self.words[self.position]
            self.position += 1
        self.state = state
        return value


def _int32(value: int) -> int:
    return (value + 2**31) % 2**32 - 2**31


def _truncated() -> FormatError:
    return FormatError("invalid .illm file: the payload ends before its last coded symbol")
