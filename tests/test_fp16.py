"""float16 training (issue 18, point 5): the LPIPS normalisation and the channel norm statistics
run in float32, where float16 would give 0/0 (an eps that rounds to 0) or overflow (squares
above 65504). Shown with CPU float16 autocast, which keeps these operations in float16."""

import pytest
import torch

from illm import metrics
from illm.losses import LPIPSLoss
from illm.models.layers import ChannelNorm2d


def features():
    """Feature vectors that float16 cannot normalise: a zero one and one of large values."""
    torch.manual_seed(0)
    values = torch.rand(2, 16, 3, 3) * 4
    values[0, :, 0, 0] = 0.0
    values[1, :, 1, 1] = 300.0  # 300^2 > 65504
    return values


def test_float16_arithmetic_fails_where_the_float32_normalisation_does_not():
    half = features().half()
    with torch.autocast("cpu", dtype=torch.float16):
        squares = torch.sum(half**2 + LPIPSLoss.EPS, dim=1, keepdim=True)
    assert squares.dtype == torch.float16 and not squares.isfinite().all()  # what autocast alone gives
    assert torch.tensor(LPIPSLoss.EPS, dtype=torch.float16) == 0


@pytest.fixture(scope="module")
def lpips_loss():
    return LPIPSLoss(metrics.lpips_network("alex", random_backbone=True))


def test_lpips_unit_normalisation_is_float32_for_half_features(lpips_loss):
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            unit = lpips_loss._unit(features().half())
        assert unit.dtype == torch.float32 and unit.isfinite().all()
        assert torch.equal(unit, lpips_loss._unit(features().half().float()))
    assert unit[0, :, 0, 0].abs().max() < 1e-3  # the zero vector stays (nearly) zero
    torch.testing.assert_close(unit[1, :, 1, 1].norm(), torch.tensor(1.0), atol=1e-3, rtol=0)


def test_lpips_loss_under_float16_autocast_is_finite_and_close_to_float32(lpips_loss):
    torch.manual_seed(1)
    x, y = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    y[1] = x[1]  # a pair of equal images: distance 0, zero differences everywhere
    expected = lpips_loss(x, y)
    with torch.autocast("cpu", dtype=torch.float16):
        distances = lpips_loss(x, y)
    assert distances.isfinite().all()
    torch.testing.assert_close(distances.float(), expected, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_channel_norm_of_large_half_activations_is_finite(layout):
    torch.manual_seed(2)
    norm = ChannelNorm2d(16).train()
    x = torch.randn(2, 16, 5, 5) * 1000  # deviations above 256: their squares overflow float16
    expected = norm(x)
    inputs = x.half().contiguous(memory_format=layout).requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        output = norm(inputs)
    output.float().square().sum().backward()
    assert output.isfinite().all() and inputs.grad.isfinite().all()
    torch.testing.assert_close(output.float(), expected, atol=2e-3, rtol=2e-3)


def test_channel_norm_keeps_float32_inputs_on_the_official_operations():
    torch.manual_seed(3)
    norm = ChannelNorm2d(8).eval()
    x = torch.randn(1, 8, 4, 4)
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, keepdim=True, unbiased=True)
    assert torch.equal(norm(x), (x - mean) * torch.rsqrt(var + 1e-3) * norm.gamma + norm.beta)
