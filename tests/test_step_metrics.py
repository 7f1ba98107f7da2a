"""The logged training scalars: means over an iteration's micro-batches (`MicroBatchMeans`), then
over the processes (`reduce_logs`), with PSNR pooled from the mean squared error."""

import math

import pytest
import torch
from accelerate import Accelerator

from illm import metrics
from illm.iteration import MicroBatchMeans, quality_logs
from illm.step_metrics import pooled_psnr, reduce_logs


@pytest.fixture
def accelerator():
    return Accelerator(cpu=True)


def fake_processes(monkeypatch, accelerator, other_processes: list[torch.Tensor]):
    """`accelerator.reduce` as if the other processes held `other_processes` (stacked values);
    records every call, so the test can count the collectives."""
    calls = []

    def reduce(tensor, reduction="mean"):
        calls.append(tensor.clone())
        assert reduction == "mean"
        return torch.stack([tensor, *other_processes]).mean(0)

    monkeypatch.setattr(accelerator, "reduce", reduce)
    return calls


def test_micro_batch_means_average_tensors_and_keep_numbers():
    means = MicroBatchMeans(3)
    for value in (1.0, 2.0, 6.0):
        means.add({"train/loss": torch.tensor(value), "train/target": 0.14})
    result = means.means()
    assert torch.equal(result["train/loss"], torch.tensor(3.0))
    assert result["train/target"] == 0.14


def test_one_micro_batch_is_its_own_mean():
    means = MicroBatchMeans(1)
    value = torch.tensor(0.123456789, dtype=torch.float32)
    means.add({"train/loss": value})
    assert torch.equal(means.means()["train/loss"], value)


def test_values_are_averaged_over_processes_in_one_collective(monkeypatch, accelerator):
    calls = fake_processes(monkeypatch, accelerator, [torch.tensor([3.0, 0.5, 100.0], dtype=torch.float64)])
    logs = {
        "train/loss": torch.tensor(1.0),
        "optim/lr": 0.5,
        "train/mse": torch.tensor(50.0, dtype=torch.float64),
    }
    reduced = reduce_logs(accelerator, logs)
    assert len(calls) == 1 and calls[0].dtype == torch.float64 and calls[0].shape == (3,)
    assert reduced["train/loss"] == 2.0 and reduced["optim/lr"] == 0.5 and reduced["train/mse"] == 75.0
    assert all(isinstance(value, float) for value in reduced.values())


def test_psnr_is_pooled_from_the_mean_squared_error(monkeypatch, accelerator):
    """Two processes with MSE 10 and 1000: the pooled PSNR is that of MSE 505, not the mean of
    the two PSNRs."""
    fake_processes(monkeypatch, accelerator, [torch.tensor([1000.0], dtype=torch.float64)])
    reduced = reduce_logs(accelerator, {"train/mse": torch.tensor(10.0, dtype=torch.float64)})
    assert reduced["train/psnr"] == pytest.approx(10 * math.log10(255**2 / 505.0), rel=1e-12)
    separate = (pooled_psnr(10.0) + pooled_psnr(1000.0)) / 2
    assert abs(reduced["train/psnr"] - separate) > 1.0


def test_micro_batches_and_processes_pool_like_one_batch(monkeypatch, accelerator):
    """Four equal-size micro-batches, two per process: the logged PSNR and MSE are those of the
    whole batch of eight images, as torchmetrics computes them."""
    torch.manual_seed(0)
    images = torch.rand(8, 3, 32, 32)
    reconstructions = (images + 0.05 * torch.randn_like(images)).clamp(0, 1)
    per_process = []
    for process in range(2):
        means = MicroBatchMeans(2)
        for micro in range(2):
            start = 4 * process + 2 * micro
            means.add(quality_logs(reconstructions[start : start + 2], images[start : start + 2]))
        per_process.append(means.means())
    fake_processes(monkeypatch, accelerator, [torch.stack([per_process[1]["train/mse"]])])
    reduced = reduce_logs(accelerator, per_process[0])
    whole = metrics.mse_255(reconstructions, images).mean().item()
    assert reduced["train/mse"] == pytest.approx(whole, rel=1e-12)
    assert reduced["train/psnr"] == pytest.approx(10 * math.log10(255**2 / whole), rel=1e-12)


def test_quality_logs_skip_ms_ssim_on_small_images():
    images = torch.rand(2, 3, 64, 64)
    assert set(quality_logs(images, images)) == {"train/mse"}
    large = torch.rand(1, 3, metrics.MS_SSIM_MIN_SIDE, metrics.MS_SSIM_MIN_SIDE)
    assert set(quality_logs(large, large)) == {"train/mse", "train/ms_ssim"}


def test_nothing_to_reduce(accelerator):
    assert reduce_logs(accelerator, {}) == {}
