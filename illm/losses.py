"""Training losses: distortion (MSE + LPIPS), HiFiC-style rate targeting, and the OASIS losses."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def bits_per_image(likelihoods: Tensor) -> Tensor:
    """-sum(log2 p) per image, in float32 whatever the autocast precision."""
    return likelihoods.float().flatten(1).log().sum(1) / -math.log(2)


class Distortion(nn.Module):
    """`mse_weight * MSE + lpips_weight * LPIPS`, images in [0, 1]; LPIPS only with `mse_lpips`."""

    def __init__(self, kind: str, mse_weight: float, lpips_weight: float = 0.0, lpips: nn.Module | None = None):
        super().__init__()
        if kind == "mse_lpips" and lpips is None:
            raise ValueError("distortion 'mse_lpips' needs an LPIPS network")
        self.kind = kind
        self.mse_weight = mse_weight
        self.lpips_weight = lpips_weight
        self.lpips = lpips if kind == "mse_lpips" else None

    def forward(self, reconstruction: Tensor, original: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        mse = F.mse_loss(reconstruction.float(), original.float())
        terms = {"mse": mse}
        loss = self.mse_weight * mse
        if self.lpips is not None:
            lpips = self.lpips(reconstruction, original).mean()
            terms["lpips"] = lpips
            loss = loss + self.lpips_weight * lpips
        return loss, terms


def scheduled(value: float, factor_before: float, switch_step: int, step: int) -> float:
    """`value * factor_before` until `switch_step`, then `value`."""
    return value * factor_before if step < switch_step else value


@dataclass
class RateOutput:
    loss: Tensor
    bpp: Tensor  # noisy total, per image
    rounded_bpp: Tensor  # of the rounded values, per image
    latent_bpp: Tensor
    hyper_bpp: Tensor
    rounded_latent_bpp: Tensor
    rounded_hyper_bpp: Tensor


def rate_loss(likelihoods: dict, rounded_likelihoods: dict, num_pixels: int, target_bpp: float, lam_below: float, lam_above: float) -> RateOutput:
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
    lam = torch.where(rounded_bpp > target_bpp, lam_above, lam_below)
    return RateOutput((lam * bpp).mean(), bpp.detach(), rounded_bpp, latent_bpp.detach(), hyper_bpp.detach(), rounded_latent_bpp, rounded_hyper_bpp)


# --- OASIS: the discriminator predicts, per patch, "fake" (class 0) or the real image's code + 1 ---


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, real_targets: Tensor) -> Tensor:
    """0.5 * [CE(D(x), labels(x) + 1) + CE(D(x_hat), 0)]; `real_targets` are already shifted by 1."""
    fake_targets = torch.zeros_like(real_targets)
    return 0.5 * (F.cross_entropy(real_logits.float(), real_targets) + F.cross_entropy(fake_logits.float(), fake_targets))


def generator_loss(fake_logits: Tensor, real_targets: Tensor) -> Tensor:
    """CE(D(x_hat), labels(x) + 1): the generator wants its patches classified as the real codes."""
    return F.cross_entropy(fake_logits.float(), real_targets)
