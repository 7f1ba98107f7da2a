"""Process-wide PyTorch backend switches: TF32 on CUDA.

On Ampere and newer GPUs, cuDNN runs float32 convolutions in TF32 by default (10-bit mantissa
products). Coding and evaluation turn it off (`full_float32`): float32 coding on a GPU then
computes the latent with float32 products, and so matches the CPU's bytes for all but latent
values within float rounding of a quantization boundary. Training leaves the choice to
``train.allow_tf32`` (`allow_tf32_convolutions`).

PyTorch 2.9 added per-backend ``fp32_precision`` settings beside the ``allow_tf32`` flags, and
reading a flag raises once the settings were changed through the new names: the flags are used
unless they raise, the new settings then.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Whose TF32 flag decides: cuDNN (convolutions) and cuBLAS (matrix products).
_CONVOLUTIONS, _MATRIX_PRODUCTS = torch.backends.cudnn, torch.backends.cuda.matmul


def _precision_settings(owner) -> tuple:
    """Where PyTorch >= 2.9 keeps the TF32 choice of ``owner`` under its new names."""
    return (owner.conv, owner.rnn) if owner is _CONVOLUTIONS else (owner,)


def _flags_readable() -> bool:
    try:
        return all(isinstance(owner.allow_tf32, bool) for owner in (_CONVOLUTIONS, _MATRIX_PRODUCTS))
    except RuntimeError:  # PyTorch >= 2.9 once the new names set something the flags cannot say
        return False


def tf32_state() -> tuple:
    """The current TF32 settings, as (object, value) pairs that `restore_tf32` sets back."""
    owners = (_CONVOLUTIONS, _MATRIX_PRODUCTS)
    if _flags_readable():
        return tuple((owner, owner.allow_tf32) for owner in owners)
    return tuple(
        (setting, setting.fp32_precision) for owner in owners for setting in _precision_settings(owner)
    )


def restore_tf32(state: tuple) -> None:
    for owner, value in state:
        if isinstance(value, str):
            owner.fp32_precision = value
        else:
            owner.allow_tf32 = value


def tf32_disabled() -> bool:
    """True when neither cuDNN convolutions nor cuBLAS matrix products may use TF32."""
    if _flags_readable():
        return not _CONVOLUTIONS.allow_tf32 and not _MATRIX_PRODUCTS.allow_tf32
    return _CONVOLUTIONS.conv.fp32_precision == "ieee" and _MATRIX_PRODUCTS.fp32_precision == "ieee"


def _set_tf32(allowed: bool, owners: tuple) -> None:
    flags = _flags_readable()
    for owner in owners:
        if flags:
            owner.allow_tf32 = allowed
        else:
            for setting in _precision_settings(owner):
                setting.fp32_precision = "tf32" if allowed else "ieee"


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Float32 convolutions and matrix products without TF32 while inside; the settings found
    are restored on leaving. Changes nothing on the CPU, whose float32 arithmetic is always full."""
    state = tf32_state()
    try:
        _set_tf32(False, (_CONVOLUTIONS, _MATRIX_PRODUCTS))
        yield
    finally:
        restore_tf32(state)


def allow_tf32_convolutions(allowed: bool) -> None:
    """Whether float32 cuDNN convolutions may use TF32 (``train.allow_tf32``); matrix products
    keep their setting (PyTorch's default: full float32)."""
    _set_tf32(allowed, (_CONVOLUTIONS,))
