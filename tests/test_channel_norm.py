"""ChannelNorm2d: the fused training path computes the official function, and is taken only
where it is free (channels-last tensors, training, gradients on)."""

import pytest
import torch

from illm.models.layers import ChannelNorm2d


def norm_with_weights(channels: int, seed: int = 0) -> ChannelNorm2d:
    torch.manual_seed(seed)
    norm = ChannelNorm2d(channels)
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 1.5)
        norm.beta.uniform_(-0.5, 0.5)
    return norm


@pytest.mark.parametrize("channels", [8, 16, 60])
def test_fused_path_equals_the_official_operations_with_gradients(channels):
    norm = norm_with_weights(channels)
    x = torch.randn(2, channels, 9, 7) * 3 + 1
    weights = torch.randn(2, channels, 9, 7)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):  # reference path, then fused
        norm.zero_grad()
        inputs = x.clone(memory_format=layout).requires_grad_()
        (norm.train()(inputs) * weights).sum().backward()
        results.append((norm(inputs).detach(), inputs.grad, norm.gamma.grad.clone(), norm.beta.grad.clone()))
    for reference, fused in zip(*results, strict=True):
        assert (fused - reference).norm() <= 1e-5 * reference.norm()


def test_fused_path_only_in_channels_last_training(monkeypatch):
    norm = norm_with_weights(8)
    calls = []
    monkeypatch.setattr(ChannelNorm2d, "_fused", lambda self, x: calls.append(x) or x)
    x = torch.randn(1, 8, 4, 4)
    norm.train()(x)  # NCHW: the official operations, no layout change
    norm.eval()(x.contiguous(memory_format=torch.channels_last))  # inference: official operations
    with torch.no_grad():
        norm.train()(x.contiguous(memory_format=torch.channels_last))
    assert calls == []
    norm.train()(x.contiguous(memory_format=torch.channels_last))
    assert len(calls) == 1
