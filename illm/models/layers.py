"""Small building blocks shared by several networks."""

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from illm.errors import IllmError


class ChannelNorm2d(nn.Module):
    """Normalises each pixel over its channels (HiFiC's ChannelNorm).

    Statistics are taken across the channel dimension only, so the output does not depend on
    the batch or the image size. The variance is the unbiased one and epsilon is 1e-3, as in the
    official implementation: the released weights were trained with exactly this. Float16 inputs
    are normalised in float32: the squared deviations of activations above 256 overflow float16
    (bfloat16 has float32's range, and float32 inputs keep the official operations bit for bit).
    """

    def __init__(self, channels: int, eps: float = 1e-3, affine: bool = True):
        super().__init__()
        self.eps = eps
        if affine:
            self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1))
            self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        else:
            self.register_parameter("gamma", None)
            self.register_parameter("beta", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and x.is_contiguous(memory_format=torch.channels_last):
            return self._fused(x)
        if x.dtype == torch.float16:
            x = x.float()
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, keepdim=True, unbiased=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        if self.gamma is not None:
            x = x * self.gamma + self.beta
        return x

    def _apply(self, fn, recurse: bool = True):
        """`nn.Module._apply` (``to``, ``cuda``, ...), keeping gamma and beta in the standard layout.

        ``to(memory_format=torch.channels_last)`` gives these 1 x C x 1 x 1 tensors the strides
        (C, 1, C, C), while their gradients (reductions over the broadcast dimensions) come in the
        standard (C, 1, 1, 1): DDP then warns "Grad strides do not match bucket view strides" and
        copies those gradients into its buckets at every step. Both layouts address the same
        memory in the same order, so nothing else changes.
        """
        super()._apply(fn, recurse)
        for parameter in (self.gamma, self.beta):
            if parameter is not None and parameter.stride() != _standard_strides(parameter.shape):
                parameter.data = parameter.data.clone(memory_format=torch.contiguous_format)
        return self

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        """The same function as one `layer_norm` over the channels, for channels-last tensors, where
        the permute is free (training with `train.channels_last`: about 6x faster forward and
        backward than the reference operations).

        layer_norm divides by the biased deviation: `(x - m) / sqrt(v_u + eps)` equals
        `sqrt((C-1)/C) * (x - m) / sqrt(v_b + eps (C-1)/C)`. Float32 inference keeps the
        official operations above, so coded files stay bit-identical to the official ones.
        """
        channels = x.shape[1]
        shrink = (channels - 1) / channels
        weight = bias = None
        if self.gamma is not None:
            weight, bias = self.gamma.reshape(channels) * shrink**0.5, self.beta.reshape(channels)
        else:
            weight = x.new_full((channels,), shrink**0.5)
        y = F.layer_norm(x.permute(0, 2, 3, 1), (channels,), weight, bias, eps=self.eps * shrink)
        return y.permute(0, 3, 1, 2)


def _standard_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def load_strict(model: nn.Module, state_dict: Mapping[str, Tensor], what: str, assign: bool = False) -> None:
    """``model.load_state_dict(state_dict, strict=True)``, or an `IllmError` in one line naming the
    first missing, unexpected or wrongly shaped entries (``what`` names the network).

    The model's own load hooks (e.g. renaming legacy keys) run before anything is compared.
    """
    try:
        result = model.load_state_dict(state_dict, strict=False, assign=assign)
        problems = [f"missing {key}" for key in result.missing_keys]
        problems += [f"unexpected {key}" for key in result.unexpected_keys]
    except RuntimeError as error:  # wrong shapes, which torch reports even when not strict
        problems = [_shape_problem(line.strip()) for line in str(error).splitlines()[1:] if line.strip()]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise IllmError(f"{what} state dict does not match its inferred architecture: {shown}")


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[(.*?)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[(.*?)\]\)"
)


def _shape_problem(line: str) -> str:
    """torch's "size mismatch for KEY: ..." line as "KEY has shape (...), expected (...)"."""
    match = _SIZE_MISMATCH.match(line)
    if not match:
        return line.rstrip(".")
    key, given, expected = match.groups()
    shape = lambda text: tuple(int(size) for size in text.split(",") if size.strip())  # noqa: E731
    return f"{key} has shape {shape(given)}, expected {shape(expected)}"
