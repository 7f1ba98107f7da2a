"""Training losses: distortion (MSE + LPIPS), HiFiC-style rate targeting, and the OASIS losses."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from illm import metrics
from illm.errors import MissingWeightsError


def bits_per_image(likelihoods: Tensor) -> Tensor:
    """-sum(log2 p) per image, in float32 whatever the autocast precision."""
    return likelihoods.float().flatten(1).log().sum(1) / -math.log(2)


class LPIPSLoss(nn.Module):
    """LPIPS as the official training loss computes it (neuralcompression's `NormFixLPIPS`).

    The lpips package unit-normalises features as `f / (sqrt(sum_c f^2) + 1e-10)`, whose gradient
    blows up where a feature vector is zero; the official loss puts its eps inside the root, per
    element: `f / sqrt(sum_c (f^2 + 1e-8))`. Same weights as the metric; per-image distances (B,).

    The normalisation runs in float32 under any autocast: in float16, 1e-8 rounds to 0 (a zero
    feature vector then gives 0/0) and squares of features above 256 overflow.
    """

    EPS = 1e-8

    def __init__(self, metric: nn.Module):
        super().__init__()
        self.net = metric.model  # the lpips.LPIPS module of `illm.metrics.LPIPSDistance`

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        net = self.net
        features_x = net.net(net.scaling_layer(2 * x - 1))
        features_y = net.net(net.scaling_layer(2 * y - 1))
        total = 0
        for lin, fx, fy in zip(net.lins, features_x, features_y):
            difference = (self._unit(fx) - self._unit(fy)) ** 2
            total = total + lin(difference).mean(dim=(2, 3), keepdim=True)
        return total.flatten()

    def _unit(self, features: Tensor) -> Tensor:
        features = features.float()
        return features / torch.sqrt(torch.sum(features**2 + self.EPS, dim=1, keepdim=True))


class Distortion(nn.Module):
    """`mse_weight * MSE + lpips_weight * LPIPS`, images in [0, 1]; LPIPS only with `mse_lpips`.

    `lpips` is the metric network (`illm.metrics.lpips_network`); the loss uses its weights with
    the official training normalisation (`LPIPSLoss`).
    """

    def __init__(
        self, kind: str, mse_weight: float, lpips_weight: float = 0.0, lpips: nn.Module | None = None
    ):
        super().__init__()
        if kind == "mse_lpips" and lpips is None:
            raise ValueError("distortion 'mse_lpips' needs an LPIPS network")
        self.kind = kind
        self.mse_weight = mse_weight
        self.lpips_weight = lpips_weight
        self.lpips = LPIPSLoss(lpips) if kind == "mse_lpips" else None

    def forward(self, reconstruction: Tensor, original: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        mse = F.mse_loss(reconstruction.float(), original.float())
        terms = {"mse": mse}
        loss = self.mse_weight * mse
        if self.lpips is not None:
            lpips = self.lpips(reconstruction, original).mean()
            terms["lpips"] = lpips
            loss = loss + self.lpips_weight * lpips
        return loss, terms


def build_lpips(lpips_cfg, needed: bool):
    """The LPIPS network (`lpips` config section), or None; stops at start when pretrained
    weights are unavailable."""
    if not needed:
        return None
    try:
        return metrics.lpips_network(lpips_cfg.net, random_backbone=lpips_cfg.backbone_weights == "random")
    except MissingWeightsError as error:
        hint = 'or set lpips.backbone_weights="random" for a run whose LPIPS is not comparable'
        raise MissingWeightsError(f"{error} ({hint})") from None


def build_distortion(distortion_cfg, lpips) -> Distortion:
    return Distortion(distortion_cfg.kind, distortion_cfg.mse_weight, distortion_cfg.lpips_weight, lpips)


def autoencoder_losses(distortion_cfg, lpips, device) -> tuple[Distortion, object]:
    """The distortion loss and the LPIPS network (validation's, or None) on `device`."""
    lpips = lpips.to(device) if lpips is not None else None
    return build_distortion(distortion_cfg, lpips).to(device), lpips


def scheduled(value: float, factor_before: float, switch_step: int, step: int) -> float:
    """`value * factor_before` until `switch_step`, then `value`."""
    return value * factor_before if step < switch_step else value


def rate_schedule(rate_cfg, step: int) -> tuple[float, float]:
    """The target bpp and λ_b in force at iteration `step` (the early phase is looser on both)."""
    target = scheduled(rate_cfg.target_bpp, rate_cfg.early_target_factor, rate_cfg.switch_step, step)
    lam_above = scheduled(rate_cfg.lam_above, rate_cfg.early_lam_factor, rate_cfg.switch_step, step)
    return target, lam_above


@dataclass
class RateOutput:
    loss: Tensor
    bpp: Tensor  # noisy total, per image
    rounded_bpp: Tensor  # of the rounded values, per image
    latent_bpp: Tensor
    hyper_bpp: Tensor
    rounded_latent_bpp: Tensor
    rounded_hyper_bpp: Tensor

    def logs(self, target_bpp: float, lam_above: float) -> dict:
        """Batch means of the rates and the schedule in force, named as the official step logs them."""
        return {
            "train/noisy_total_bpp": self.bpp.mean(),
            "train/quantized_total_bpp": self.rounded_bpp.mean(),
            "train/noisy_hyper_bpp": self.hyper_bpp.mean(),
            "train/quantized_hyper_bpp": self.rounded_hyper_bpp.mean(),
            "train/noisy_latent_bpp": self.latent_bpp.mean(),
            "train/quantized_latent_bpp": self.rounded_latent_bpp.mean(),
            "train/target": target_bpp,
            "train/lam2": lam_above,
        }


def rate_loss(
    likelihoods: dict,
    rounded_likelihoods: dict,
    num_pixels: int,
    target_bpp: float,
    lam_below: float,
    lam_above: float,
) -> RateOutput:
    """HiFiC rate targeting: λ per image is `lam_above` when its rounded bpp exceeds the target.

    The loss weighs the noisy (differentiable) bpp; the choice of λ uses the bpp of the
    rounded values, which is what the file will cost.
    """
    latent_bpp = bits_per_image(likelihoods["latent"]) / num_pixels
    hyper_bpp = bits_per_image(likelihoods["hyper"]) / num_pixels
    rounded_latent_bpp = bits_per_image(rounded_likelihoods["latent"]).detach() / num_pixels
    rounded_hyper_bpp = bits_per_image(rounded_likelihoods["hyper"]).detach() / num_pixels
    bpp = latent_bpp + hyper_bpp
    rounded_bpp = rounded_latent_bpp + rounded_hyper_bpp
    loss = targeted_rate(bpp, rounded_bpp, target_bpp, lam_below, lam_above)
    return RateOutput(
        loss,
        bpp.detach(),
        rounded_bpp,
        latent_bpp.detach(),
        hyper_bpp.detach(),
        rounded_latent_bpp,
        rounded_hyper_bpp,
    )


def targeted_rate(
    bpp: Tensor, rounded_bpp: Tensor, target_bpp: float, lam_below: float, lam_above: float
) -> Tensor:
    """mean(λ · bpp) over the images, λ = `lam_above` where the rounded bpp exceeds the target."""
    lam = torch.where(rounded_bpp > target_bpp, lam_above, lam_below)
    return (lam * bpp).mean()


# --- OASIS: the discriminator predicts, per patch, "fake" (class 0) or the real image's code + 1 ---


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, real_targets: Tensor) -> Tensor:
    """0.5 * [CE(D(x), labels(x) + 1) + CE(D(x_hat), 0)]; `real_targets` are already shifted by 1."""
    fake_targets = torch.zeros_like(real_targets)
    return 0.5 * (
        F.cross_entropy(real_logits.float(), real_targets)
        + F.cross_entropy(fake_logits.float(), fake_targets)
    )


def generator_loss(fake_logits: Tensor, real_targets: Tensor) -> Tensor:
    """CE(D(x_hat), labels(x) + 1): the generator wants its patches classified as the real codes."""
    return F.cross_entropy(fake_logits.float(), real_targets)
