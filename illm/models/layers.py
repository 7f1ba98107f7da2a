"""Small building blocks shared by several networks."""

import torch
from torch import nn


class ChannelNorm2d(nn.Module):
    """Normalises each pixel over its channels (HiFiC's ChannelNorm).

    Statistics are taken across the channel dimension only, so the output does not depend on
    the batch or the image size. The variance is the unbiased one and epsilon is 1e-3, as in the
    official implementation: the released weights were trained with exactly this.
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
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, keepdim=True, unbiased=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        if self.gamma is not None:
            x = x * self.gamma + self.beta
        return x
