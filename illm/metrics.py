"""Image quality metrics, following the protocol of the official MS-ILLM evaluation.

Full-reference metrics are computed per image on 8-bit images (both images rounded to
0..255 first, as a decoder writing a PNG would):

- ``psnr``: data range 255, ``10*log10(255**2 / MSE)``; ``inf`` for identical images.
- ``ms_ssim``: pytorch-msssim, data range 255, 11x11 Gaussian window (sigma 1.5), five scales.
  Needs images larger than 160 pixels per side.
- ``lpips``: LPIPS v0.1 with an AlexNet backbone (the ``lpips`` package), inputs scaled to [-1, 1].
- ``dists``: DISTS (piq) at full resolution, as ``DISTS_pytorch`` in the official evaluation
  (piq's own ``forward`` first shrinks images to 256 pixels; that step is skipped here).

Distribution metrics compare the sets of original and reconstructed images with the FID/256
protocol of HiFiC (Mentzer et al. 2020): every image is cut into non-overlapping 256x256
patches, plus a second grid shifted by 128 pixels when both sides are at least 384 pixels.

- ``fid``: Frechet distance of Inception-v3 pool features (the TF-FID weights of torch-fidelity).
- ``kid``: kernel inception distance (mean over 100 subsets of at most 1000 patches).
- ``fid_swav``: Frechet distance of SwAV ResNet-50 features (Kynkaanniemi et al. 2023).

Pretrained backbones are looked up in the torch hub cache (``$TORCH_HOME/hub/checkpoints``)
and downloaded there when possible; otherwise building them raises ``MissingWeightsError``.
Every builder takes ``random_backbone=True`` to use randomly initialised weights instead,
which keeps the pipeline testable offline (the numbers are then meaningless).
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from pathlib import Path

import lpips
import piq
import pytorch_msssim
import torch
import torchvision
from piq.perceptual import VGG16_LAYERS
from torch import Tensor, nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torchvision.models.vgg import cfgs as VGG_CONFIGS
from torchvision.models.vgg import make_layers as make_vgg_layers

from illm.download import cached_file
from illm.errors import ConfigError, MissingWeightsError, one_line

FULL_REFERENCE_METRICS = ("psnr", "ms_ssim", "lpips", "dists")
DISTRIBUTION_METRICS = ("fid", "kid", "fid_swav")
ALL_METRICS = FULL_REFERENCE_METRICS + DISTRIBUTION_METRICS
DEFAULT_METRICS = ("psnr", "ms_ssim", "lpips", "dists", "fid", "kid")

FID_PATCH_SIZE = 256
MS_SSIM_MIN_SIDE = 161  # five scales of an 11-pixel window: pytorch-msssim asserts side > 160
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
FEATURE_BATCH_SIZE = 32

SWAV_URL = "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar"
DISTS_URL = "https://github.com/photosynthesis-team/piq/releases/download/v0.4.1/dists_weights.pt"
# The official FrechetInceptionDistanceSwAV normalises with these constants (0.228, sic).
SWAV_MEAN = (0.485, 0.456, 0.406)
SWAV_STD = (0.228, 0.224, 0.225)


# ----------------------------------------------------------------------------------------
# Full-reference metrics on 8-bit images
# ----------------------------------------------------------------------------------------


def to_255(images: Tensor) -> Tensor:
    """Images in [0, 1] (float) or 0..255 (uint8) -> float32 0..255, rounded to integers."""
    if images.dtype == torch.uint8:
        return images.float()
    return torch.round(images.detach().clamp(0.0, 1.0) * 255.0)


def mse_255(x: Tensor, y: Tensor) -> Tensor:
    """Per-image mean squared error (B,) of the 8-bit-rounded images, on the 0..255 scale (float64)."""
    squared_error = (to_255(x).double() - to_255(y).double()) ** 2
    return squared_error.flatten(1).mean(dim=1)


def psnr_of_mse(mse: Tensor) -> Tensor:
    return (10.0 * torch.log10(255.0**2 / mse)).float()


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR in dB (B,) of the 8-bit-rounded images, data range 255.

    Identical images give ``inf``.
    """
    return psnr_of_mse(mse_255(x, y))


def ms_ssim(x: Tensor, y: Tensor) -> Tensor:
    """Per-image MS-SSIM (B,) of the 8-bit-rounded images, data range 255.

    Raises ValueError for images with a side shorter than ``MS_SSIM_MIN_SIDE`` pixels.
    """
    if min(x.shape[-2:]) < MS_SSIM_MIN_SIDE:
        raise ValueError(
            f"MS-SSIM needs images of at least {MS_SSIM_MIN_SIDE} pixels per side, got {tuple(x.shape[-2:])}"
        )
    return pytorch_msssim.ms_ssim(to_255(x), to_255(y), data_range=255.0, size_average=False)


# ----------------------------------------------------------------------------------------
# Pretrained weights: the torch hub cache, or a clear error
# ----------------------------------------------------------------------------------------


def _load(path: Path) -> dict:
    """Load a cached state dict; an unreadable file is reported like a missing one."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise MissingWeightsError(
            f"cannot read the weights file {path} ({one_line(error)}); delete it so that it is fetched again"
        ) from None


class _FrozenModule(nn.Module):
    """A metric network: no trainable parameters, and eval mode whatever the parent's mode."""

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> _FrozenModule:
        return super().train(False)


# ----------------------------------------------------------------------------------------
# Perceptual distances
# ----------------------------------------------------------------------------------------


class LPIPSDistance(_FrozenModule):
    """LPIPS v0.1 distance between images in [0, 1]: ``forward(x, y) -> (B,)``, differentiable."""

    def __init__(self, net: str = "alex", random_backbone: bool = False):
        super().__init__()
        backbones = {"alex": torchvision.models.AlexNet_Weights, "vgg": torchvision.models.VGG16_Weights}
        if net not in backbones:
            raise ConfigError(f"unknown LPIPS network {net!r}: expected 'alex' or 'vgg'")
        if not random_backbone:
            cached_file(backbones[net].IMAGENET1K_V1.url, f"LPIPS ({net}) backbone", check_hash=True)
        with warnings.catch_warnings():  # lpips uses torchvision's deprecated `pretrained=` argument
            warnings.simplefilter("ignore", UserWarning)
            # The linear-layer weights ship inside the lpips package; only the backbone is fetched.
            self.model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=random_backbone, verbose=False)
        self._freeze()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.model(x, y, normalize=True).flatten()


def lpips_network(net: str = "alex", random_backbone: bool = False) -> LPIPSDistance:
    """Frozen LPIPS network (eval mode) taking images in [0, 1] and returning one distance per image.

    Raises ``MissingWeightsError`` when the ImageNet backbone is neither cached nor downloadable.
    """
    return LPIPSDistance(net, random_backbone)


class _FullResolutionDISTS(piq.DISTS):
    """piq's DISTS without its resize to 256 pixels, as ``DISTS_pytorch`` (the official metric)."""

    def __init__(self, vgg_features: nn.Module, alpha: Tensor, beta: Tensor):
        channels = [3, 64, 128, 256, 512, 512]
        total = alpha.sum() + beta.sum()  # DISTS_pytorch normalises the weights by their sum
        weights = [*torch.split(alpha / total, channels, dim=1), *torch.split(beta / total, channels, dim=1)]
        layers = [VGG16_LAYERS[name] for name in ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")]
        # piq.DISTS.__init__ always downloads; ContentLoss.__init__ accepts the backbone directly.
        piq.ContentLoss.__init__(
            self,
            vgg_features,
            layers=layers,
            weights=weights,
            replace_pooling=True,
            reduction="none",
            normalize_features=False,
            allow_layers_weights_mismatch=True,
        )

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return 1 - piq.ContentLoss.forward(self, x, y)


class DISTSDistance(_FrozenModule):
    """DISTS distance between images in [0, 1] at full resolution: ``forward(x, y) -> (B,)``."""

    def __init__(self, random_backbone: bool = False):
        super().__init__()
        vgg_features = make_vgg_layers(VGG_CONFIGS["D"])  # VGG-16 without its classifier
        if random_backbone:
            alpha, beta = torch.rand(1, 1475, 1, 1), torch.rand(1, 1475, 1, 1)
        else:
            vgg_url = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
            vgg_state = _load(cached_file(vgg_url, "DISTS VGG-16 backbone", check_hash=True))
            features = {
                k.removeprefix("features."): v for k, v in vgg_state.items() if k.startswith("features.")
            }
            vgg_features.load_state_dict(features)
            dists_weights = _load(cached_file(DISTS_URL, "DISTS"))
            alpha, beta = dists_weights["alpha"], dists_weights["beta"]
        self.model = _FullResolutionDISTS(vgg_features, alpha, beta)
        self._freeze()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.model(x, y)


def dists_network(random_backbone: bool = False) -> DISTSDistance:
    """Frozen DISTS network taking images in [0, 1] and returning one distance per image."""
    return DISTSDistance(random_backbone)


# ----------------------------------------------------------------------------------------
# Feature extractors for FID / KID / FID-SwAV (uint8 patches in, float features out)
# ----------------------------------------------------------------------------------------


class _UntrainedInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's FID Inception-v3 with random weights.

    Its ``__init__`` always loads a weights file and hands it to ``load_state_dict`` (there is
    no option to skip that): given an empty one, this subclass initialises the weights instead.
    """

    def __init__(self):
        empty_file = io.BytesIO()
        torch.save({}, empty_file)
        empty_file.seek(0)
        super().__init__("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty_file)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if state_dict:  # a real state dict loads as usual
            return super().load_state_dict(state_dict, strict, assign)
        for module in self.modules():  # PyTorch's default init makes the features vanish
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")


class InceptionFeatures(_FrozenModule):
    """2048-d pool features of the TF-FID Inception-v3 (torch-fidelity); uint8 B×3×H×W input."""

    def __init__(self, random_backbone: bool = False):
        super().__init__()
        if random_backbone:
            self.model = _UntrainedInceptionV3()
        else:
            path = cached_file(URL_INCEPTION_V3, "FID Inception-v3")
            self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(path))
        self._freeze()

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)[0]


class SwAVFeatures(_FrozenModule):
    """2048-d features of the SwAV ResNet-50 (``torch.hub facebookresearch/swav:main resnet50``).

    That hub entry is torchvision's ResNet-50 with the SwAV checkpoint loaded and ``fc``
    unused, so it is built here from torchvision and the checkpoint file alone.
    """

    def __init__(self, random_backbone: bool = False):
        super().__init__()
        self.model = torchvision.models.resnet50(weights=None)
        self.model.fc = nn.Identity()
        if not random_backbone:
            path = cached_file(SWAV_URL, "SwAV ResNet-50")
            state = _load(path)
            state = {key.removeprefix("module."): value for key, value in state.items()}
            missing, _ = self.model.load_state_dict(state, strict=False)  # projection head unused
            if missing:
                raise MissingWeightsError(
                    f"SwAV weights {path} lack {len(missing)} backbone tensors, e.g. {missing[0]}"
                )
        self.register_buffer("mean", torch.tensor(SWAV_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(SWAV_STD).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    def forward(self, images: Tensor) -> Tensor:
        return self.model((images.float() / 255.0 - self.mean) / self.std)


def inception_network(random_backbone: bool = False) -> InceptionFeatures:
    """Frozen FID Inception-v3 feature extractor (uint8 images in, B×2048 features out)."""
    return InceptionFeatures(random_backbone)


def swav_network(random_backbone: bool = False) -> SwAVFeatures:
    """Frozen SwAV ResNet-50 feature extractor (uint8 images in, B×2048 features out)."""
    return SwAVFeatures(random_backbone)


# ----------------------------------------------------------------------------------------
# FID/256 patches and distribution distances
# ----------------------------------------------------------------------------------------


def _grid_patches(images: Tensor, patch_size: int) -> Tensor:
    batch, channels, height, width = images.shape
    rows, cols = height // patch_size, width // patch_size
    grid = images[:, :, : rows * patch_size, : cols * patch_size]
    grid = grid.reshape(batch, channels, rows, patch_size, cols, patch_size)
    return grid.permute(0, 2, 4, 1, 3, 5).reshape(-1, channels, patch_size, patch_size)


def fid_patches(images: Tensor, patch_size: int = FID_PATCH_SIZE) -> Tensor:
    """The FID/256 patches of B×3×H×W images as uint8 N×3×P×P.

    Non-overlapping P×P patches in row-major order, then (when both sides are at least 1.5 P)
    those of the image shifted by P/2 in both directions, as ``update_patch_fid`` in
    neuralcompression. Images smaller than P give no patch.
    """
    images = to_255(images).to(torch.uint8)
    patches = [_grid_patches(images, patch_size)]
    height, width = images.shape[-2:]
    if height >= 1.5 * patch_size and width >= 1.5 * patch_size:
        patches.append(_grid_patches(images[:, :, patch_size // 2 :, patch_size // 2 :], patch_size))
    return torch.cat(patches)


def frechet_distance(real_features: Tensor, fake_features: Tensor) -> float:
    """Frechet distance between two feature sets (N×D), computed by torch-fidelity in float64."""
    real_stats = fid_features_to_statistics(real_features.double().cpu())
    fake_stats = fid_features_to_statistics(fake_features.double().cpu())
    return fid_statistics_to_metric(real_stats, fake_stats, verbose=False)["frechet_inception_distance"]


class FeatureMoments:
    """Count, sum and sum of outer products (float64, on the features' device) of feature vectors:
    all a Frechet distance needs, in memory that does not grow with the number of images (the
    statistics torchmetrics' `FrechetInceptionDistance` accumulates)."""

    def __init__(self):
        self.count = 0
        self.sum: Tensor | None = None
        self.outer_sum: Tensor | None = None

    def add(self, features: Tensor) -> None:
        """Add N x D features."""
        features = features.detach().double()
        if self.sum is None:
            dim = features.shape[1]
            self.sum = features.new_zeros(dim)
            self.outer_sum = features.new_zeros(dim, dim)
        self.count += features.shape[0]
        self.sum += features.sum(0)
        self.outer_sum += features.T @ features

    def statistics(self) -> dict:
        """Mean and unbiased covariance (as `numpy.cov`), as torch-fidelity's statistics dict."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mean = self.sum / self.count
        covariance = (self.outer_sum - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return {"mu": mean.cpu().numpy(), "sigma": covariance.cpu().numpy()}


def frechet_distance_of_moments(real: FeatureMoments, fake: FeatureMoments) -> float:
    """`frechet_distance` from accumulated moments instead of the features themselves."""
    return fid_statistics_to_metric(real.statistics(), fake.statistics(), verbose=False)[
        "frechet_inception_distance"
    ]


def kernel_distance(real_features: Tensor, fake_features: Tensor) -> float:
    """Mean KID (torch-fidelity: cubic polynomial kernel, 100 subsets, fixed seed).

    The subset size is 1000 as in the official evaluation, or the number of samples when
    there are fewer.
    """
    subset_size = min(KID_SUBSET_SIZE, len(real_features), len(fake_features))
    result = kid_features_to_metric(
        real_features.double().cpu(),
        fake_features.double().cpu(),
        kid_subsets=KID_SUBSETS,
        kid_subset_size=subset_size,
        verbose=False,
    )
    return result["kernel_inception_distance_mean"]


# ----------------------------------------------------------------------------------------
# Accumulator for evaluation and training validation
# ----------------------------------------------------------------------------------------

_BUILDERS = {
    "lpips": lpips_network,
    "dists": dists_network,
    "inception": inception_network,
    "swav": swav_network,
}
_NETWORK_OF_METRIC = {
    "lpips": "lpips",
    "dists": "dists",
    "fid": "inception",
    "kid": "inception",
    "fid_swav": "swav",
}


def _shared_network(name: str, random_backbone: bool, device: str) -> nn.Module:
    """The metric network ``name``, built once per process and shared by every ``ImageMetrics``."""
    network = _cached_build(name, random_backbone, device, torch.hub.get_dir())
    if isinstance(network, MissingWeightsError):
        raise network
    return network


@functools.lru_cache(maxsize=None)
def _cached_build(
    name: str, random_backbone: bool, device: str, hub_dir: str
) -> nn.Module | MissingWeightsError:
    # A failure is remembered too: each missing file is looked for (and downloaded) once.
    try:
        return _BUILDERS[name](random_backbone=random_backbone).to(device)
    except MissingWeightsError as error:
        return error


class ImageMetrics:
    """Accumulates metrics over pairs of original and reconstructed images.

    ``update(original, reconstruction)`` takes B×3×H×W images (float in [0, 1] or uint8),
    returns the per-image values of the full-reference metrics, and collects the FID/256
    patch features; ``compute()`` returns one value per requested metric (the mean over
    images for full-reference metrics), ``None`` where it has none. ``missing`` maps each
    metric without a value to the one-line reason (weights unavailable, images too small...).
    """

    def __init__(
        self,
        metrics: tuple[str, ...] | list[str] = DEFAULT_METRICS,
        device: str | torch.device = "cpu",
        random_backbones: bool = False,
    ):
        unknown = sorted(set(metrics) - set(ALL_METRICS))
        if unknown:
            raise ConfigError(
                f"unknown metric(s) {', '.join(unknown)}: expected some of {', '.join(ALL_METRICS)}"
            )
        self.metrics = tuple(name for name in ALL_METRICS if name in metrics)
        self.device = torch.device(device)
        self.random_backbones = random_backbones
        self.missing: dict[str, str] = {}
        self.networks: dict[str, nn.Module] = {}
        for network in dict.fromkeys(_NETWORK_OF_METRIC[m] for m in self.metrics if m in _NETWORK_OF_METRIC):
            try:
                self.networks[network] = _shared_network(network, random_backbones, str(self.device))
            except MissingWeightsError as error:
                self.missing.update(
                    {m: str(error) for m in self.metrics if _NETWORK_OF_METRIC.get(m) == network}
                )
        self.feature_networks = sorted(
            {
                _NETWORK_OF_METRIC[m]
                for m in self.metrics
                if m in DISTRIBUTION_METRICS and m not in self.missing
            }
        )
        self.reset()

    def reset(self) -> None:
        """Forget all images seen so far (keeps the networks)."""
        self.values: dict[str, list[float]] = {name: [] for name in FULL_REFERENCE_METRICS}
        self.features: dict[str, dict[str, list[Tensor]]] = {
            name: {"real": [], "fake": []} for name in self.feature_networks
        }
        self.num_images = 0
        self.num_patches = 0

    def _active(self, metric: str) -> bool:
        return metric in self.metrics and metric not in self.missing

    @torch.no_grad()
    def update(self, original: Tensor, reconstruction: Tensor) -> dict[str, list[float | None]]:
        """Add a batch of image pairs; returns the per-image values of the full-reference metrics."""
        if original.shape != reconstruction.shape:
            raise ValueError(
                f"shape mismatch: original {tuple(original.shape)}, reconstruction "
                f"{tuple(reconstruction.shape)}"
            )
        original = to_255(original.to(self.device)).to(torch.uint8)
        reconstruction = to_255(reconstruction.to(self.device)).to(torch.uint8)
        batch = original.shape[0]
        per_image: dict[str, list[float | None]] = {}
        if self._active("psnr"):
            per_image["psnr"] = psnr(original, reconstruction).tolist()
        if self._active("ms_ssim"):
            large_enough = min(original.shape[-2:]) >= MS_SSIM_MIN_SIDE
            per_image["ms_ssim"] = (
                ms_ssim(original, reconstruction).tolist() if large_enough else [None] * batch
            )
        for metric in ("lpips", "dists"):
            if self._active(metric):
                distance = self.networks[metric](original.float() / 255.0, reconstruction.float() / 255.0)
                per_image[metric] = distance.tolist()
        for metric, values in per_image.items():
            self.values[metric].extend(values)
        self._update_features(original, reconstruction)
        self.num_images += batch
        return per_image

    def _update_features(self, original: Tensor, reconstruction: Tensor) -> None:
        if not self.feature_networks:
            return
        real, fake = fid_patches(original), fid_patches(reconstruction)
        self.num_patches += len(real)
        for name in self.feature_networks:
            network = self.networks[name]
            for kind, patches in (("real", real), ("fake", fake)):
                for chunk in patches.split(FEATURE_BATCH_SIZE):
                    self.features[name][kind].append(network(chunk).float().cpu())

    def compute(self) -> dict[str, float | None]:
        """One value per requested metric (``None`` where there is none; see ``missing``)."""
        results: dict[str, float | None] = {}
        for metric in self.metrics:
            results[metric] = None
            if metric in self.missing:
                continue
            if metric in FULL_REFERENCE_METRICS:
                results[metric] = self._mean(metric)
            else:
                results[metric] = self._distribution_distance(metric)
        return results

    def _mean(self, metric: str) -> float | None:
        values = self.values[metric]
        if not values:
            self.missing[metric] = "no images"
            return None
        if any(value is None for value in values):
            self.missing[metric] = f"needs images of at least {MS_SSIM_MIN_SIDE} pixels per side"
            return None
        return math.fsum(values) / len(values)

    def _distribution_distance(self, metric: str) -> float | None:
        features = self.features[_NETWORK_OF_METRIC[metric]]
        if self.num_patches < 2:
            self.missing[metric] = (
                f"needs at least 2 patches of {FID_PATCH_SIZE}x{FID_PATCH_SIZE} pixels, got "
                f"{self.num_patches}"
            )
            return None
        real, fake = torch.cat(features["real"]), torch.cat(features["fake"])
        return kernel_distance(real, fake) if metric == "kid" else frechet_distance(real, fake)
