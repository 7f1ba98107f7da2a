import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from illm import metrics
from illm.errors import MissingWeightsError


def test_psnr_matches_hand_computation_on_rounded_images():
    original = torch.zeros(1, 3, 4, 4)
    original[..., 0, 0] = 100 / 255
    # 10.4/255 rounds to level 10: every pixel is 10 levels off, except (0, 0) at 100 -> 90
    reconstruction = torch.full((1, 3, 4, 4), 10.4 / 255)
    reconstruction[..., 0, 0] = 90 / 255
    expected = 10 * math.log10(255**2 / 100)
    assert metrics.psnr(original, reconstruction).item() == pytest.approx(expected, abs=1e-4)
    as_uint8 = metrics.psnr(
        (original * 255).round().to(torch.uint8), (reconstruction * 255).round().to(torch.uint8)
    )
    assert as_uint8.item() == pytest.approx(expected, abs=1e-4)


def test_psnr_is_per_image_and_infinite_for_identical_images():
    images = torch.randint(0, 256, (2, 3, 8, 8)) / 255
    noisy = images.clone()
    noisy[1] = (noisy[1] + 0.1).clamp(0, 1)
    values = metrics.psnr(images, noisy)
    assert values.shape == (2,)
    assert math.isinf(values[0].item()) and values[0] > 0
    assert math.isfinite(values[1].item())
    # differences below half an 8-bit level vanish in the rounding
    assert math.isinf(metrics.psnr(images, images + 0.4 / 255).min().item())


def test_ms_ssim_is_one_for_identical_images_and_lower_otherwise():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 176, 192)
    assert torch.allclose(metrics.ms_ssim(images, images), torch.ones(2))
    degraded = (images + 0.2 * torch.randn_like(images)).clamp(0, 1)
    values = metrics.ms_ssim(images, degraded)
    assert values.shape == (2,) and (values < 0.99).all() and (values > 0).all()


def test_ms_ssim_refuses_images_too_small_for_five_scales():
    small = torch.rand(1, 3, 160, 256)
    with pytest.raises(ValueError, match="161"):
        metrics.ms_ssim(small, small)


def test_lpips_random_backbone_gives_distances_and_input_gradients(offline):
    network = metrics.lpips_network("alex", random_backbone=True)
    torch.manual_seed(0)
    x = torch.rand(3, 3, 64, 96, requires_grad=True)
    y = torch.rand(3, 3, 64, 96)
    distances = network(x, y)
    assert distances.shape == (3,) and torch.isfinite(distances).all()
    distances.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in network.parameters())
    network.train()  # e.g. a parent module switching to training mode: dropout must stay off
    assert not network.training and not any(m.training for m in network.modules())
    assert torch.equal(network(x, y), distances)
    assert torch.allclose(network(y, y), torch.zeros(3), atol=1e-6)


def test_dists_random_backbone_is_zero_for_identical_images(offline):
    network = metrics.dists_network(random_backbone=True)
    x, y = torch.rand(2, 3, 64, 96), torch.rand(2, 3, 64, 96)
    assert torch.allclose(network(x, x), torch.zeros(2), atol=1e-5)
    assert (network(x, y) > 1e-3).all()


@pytest.mark.parametrize(
    "height, width, expected",
    [
        (512, 768, 2 * 3 + 1 * 2),
        (300, 300, 1),
        (384, 384, 1 + 1),
        (383, 1024, 4),
        (200, 300, 0),
        (256, 256, 1),
    ],
)
def test_fid_patch_counts(height, width, expected):
    assert len(metrics.fid_patches(torch.rand(1, 3, height, width))) == expected


def test_fid_patches_match_the_unfold_of_the_official_implementation():
    image = torch.rand(1, 3, 512, 768)

    def unfold(x):  # as neuralcompression's update_patch_fid, on the 8-bit levels
        levels = torch.round(x * 255)
        return F.unfold(levels, kernel_size=256, stride=256).permute(0, 2, 1).reshape(-1, 3, 256, 256)

    expected = torch.cat([unfold(image), unfold(image[:, :, 128:, 128:])]).to(torch.uint8)
    patches = metrics.fid_patches(image)
    assert patches.dtype == torch.uint8 and torch.equal(patches, expected)


def test_frechet_distance_matches_the_closed_form():
    from scipy import linalg

    rng = np.random.default_rng(0)
    real = rng.normal(1.0, 2.0, size=(500, 4))
    fake = rng.normal(-0.5, 0.5, size=(400, 4)) @ rng.normal(size=(4, 4))
    mean_real, mean_fake = real.mean(axis=0), fake.mean(axis=0)
    cov_real, cov_fake = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covariance_term = np.trace(cov_real + cov_fake - 2 * linalg.sqrtm(cov_real @ cov_fake).real)
    expected = np.sum((mean_real - mean_fake) ** 2) + covariance_term
    real, fake = torch.from_numpy(real), torch.from_numpy(fake)
    assert metrics.frechet_distance(real, fake) == pytest.approx(expected, rel=1e-6)
    assert metrics.frechet_distance(real, real) == pytest.approx(0.0, abs=1e-9)


def test_kernel_distance_handles_fewer_samples_than_the_subset_size():
    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.normal(size=(20, 8)))
    far = torch.from_numpy(rng.normal(3.0, 1.0, size=(20, 8)))
    assert metrics.kernel_distance(real, far) > 10 * abs(
        metrics.kernel_distance(real, real[torch.randperm(20)])
    )


def test_missing_backbone_raises_a_one_line_error_naming_the_file(offline):
    with pytest.raises(MissingWeightsError) as error:
        metrics.lpips_network("alex")
    message = str(error.value)
    assert "\n" not in message
    assert str(offline / "alexnet-owt-7be5be79.pth") in message and "network disabled in tests" in message
    assert not offline.exists() or not any(offline.iterdir())  # nothing half-written in the cache


def test_image_metrics_report_missing_backbones_and_compute_the_rest(offline):
    accumulator = metrics.ImageMetrics(metrics.ALL_METRICS, random_backbones=False)
    assert set(accumulator.missing) == {"lpips", "dists", "fid", "kid", "fid_swav"}
    assert "FID Inception-v3 weights are missing" in accumulator.missing["kid"]
    original = torch.rand(1, 3, 176, 176)
    per_image = accumulator.update(original, (original + 0.05).clamp(0, 1))
    assert set(per_image) == {"psnr", "ms_ssim"}
    results = accumulator.compute()
    assert results["lpips"] is None and results["fid"] is None
    assert results["psnr"] == pytest.approx(per_image["psnr"][0]) and 0 < results["ms_ssim"] < 1


def test_image_metrics_with_random_backbones_compute_everything(offline, monkeypatch):
    feature_shapes = []
    real_frechet_distance = metrics.frechet_distance

    def fast_frechet_distance(real, fake):  # 2048-d eigenvalues take seconds: test on 8 dimensions
        feature_shapes.append((tuple(real.shape), tuple(fake.shape)))
        return real_frechet_distance(real[:, :8], fake[:, :8])

    monkeypatch.setattr(metrics, "frechet_distance", fast_frechet_distance)
    torch.manual_seed(0)
    accumulator = metrics.ImageMetrics(metrics.ALL_METRICS, random_backbones=True)
    assert accumulator.missing == {}
    for _ in range(2):
        original = torch.rand(1, 3, 256, 256)
        per_image = accumulator.update(original, (original * 0.5).clamp(0, 1))
        assert set(per_image) == set(metrics.FULL_REFERENCE_METRICS)
    results = accumulator.compute()
    assert accumulator.num_patches == 2 and accumulator.num_images == 2
    assert feature_shapes == [((2, 2048), (2, 2048))] * 2  # Inception (fid) and SwAV (fid_swav)
    assert set(results) == set(metrics.ALL_METRICS) and accumulator.missing == {}
    assert all(math.isfinite(value) for value in results.values())
    assert results["psnr"] < 20 and results["lpips"] > 1e-4 and results["fid"] > 0 and results["fid_swav"] > 0


def test_image_metrics_explain_what_cannot_be_computed(offline):
    accumulator = metrics.ImageMetrics(("psnr", "ms_ssim", "fid"), random_backbones=True)
    small = torch.rand(1, 3, 64, 96)
    accumulator.update(small, small)
    results = accumulator.compute()
    assert results["ms_ssim"] is None and "161" in accumulator.missing["ms_ssim"]
    assert results["fid"] is None and "got 0" in accumulator.missing["fid"]
    assert math.isinf(results["psnr"])
