"""Validation of the autoencoder (stages 1 and 2) and the one averager every stage validates with."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from illm import metrics
from illm.losses import Distortion, rate_loss, rate_schedule


@contextmanager
def evaluating(*models: nn.Module):
    """Eval mode and no gradients for the block, then each model back to the mode it had."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


class SampleMeans:
    """Per-image values averaged over the images of every process, each image counted once.

    Accelerate evens out the validation shards by repeating samples on the last batch;
    `gather_for_metrics` drops those repeats, which a sum-then-`reduce` would count.
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, values: Tensor) -> None:
        """`values`: one per image of this process's batch (a scalar is repeated for each)."""
        values = self.accelerator.gather_for_metrics(values.detach().double().contiguous())
        self.sums[name] = self.sums.get(name, 0) + values.sum()
        self.counts[name] = self.counts.get(name, 0) + values.numel()

    def gather(self, values: Tensor) -> Tensor:
        """Every process's `values` without the repeats, for statistics other than a mean."""
        return self.accelerator.gather_for_metrics(values.contiguous())

    def means(self) -> dict[str, float]:
        return {name: (self.sums[name] / self.counts[name]).item() for name in self.sums}


def validation_images(val_loader):
    """The validation batches' images, leaving out batches whose every file was unreadable."""
    for batch in val_loader:
        if batch.images.shape[0]:
            yield batch.images


def image_quality(reconstruction: Tensor, images: Tensor, lpips) -> dict[str, Tensor]:
    """Per-image `val/psnr`, `val/ms_ssim` (images large enough) and `val/lpips` (with a network)
    of a reconstruction clamped to [0, 1]."""
    quality = {"val/psnr": metrics.psnr(reconstruction, images)}
    if min(images.shape[-2:]) >= metrics.MS_SSIM_MIN_SIDE:
        quality["val/ms_ssim"] = metrics.ms_ssim(reconstruction, images)
    if lpips is not None:
        quality["val/lpips"] = lpips(reconstruction, images).flatten()
    return quality


def validate_autoencoder(
    run, model, val_loader, distortion: Distortion, lpips, rate_cfg, step: int, fixed: dict
) -> dict:
    """Eval-mode (rounded) metrics over the validation set, averaged over all processes;
    logs them and the fixed images' reconstructions."""
    accelerator = run.accelerator
    unwrapped = accelerator.unwrap_model(model)
    target, lam_above = rate_schedule(rate_cfg, step)
    averages = SampleMeans(accelerator)
    with evaluating(unwrapped):
        for images in validation_images(val_loader):
            with accelerator.autocast():
                out = unwrapped(images)
            recon = out.images.float().clamp(0, 1)
            dist, terms = distortion(recon, images)
            num_pixels = images.shape[-2] * images.shape[-1]
            rate = rate_loss(
                out.likelihoods, out.rounded_likelihoods, num_pixels, target, rate_cfg.lam_below, lam_above
            )
            per_image = {
                **image_quality(recon, images, lpips),
                "val/bpp": rate.rounded_bpp,
                "val/latent_bpp": rate.rounded_latent_bpp,
                "val/hyper_bpp": rate.rounded_hyper_bpp,
            }
            batch_terms = {"val/distortion_loss": dist, "val/rate_loss": rate.loss}
            batch_terms.update({f"val/distortion_{k}": v for k, v in terms.items()})
            per_image.update({name: value.expand(images.shape[0]) for name, value in batch_terms.items()})
            for name, values in per_image.items():
                averages.add(name, values)
        results = averages.means()
        for split, images in fixed.items():
            if images is not None:
                recon = unwrapped(images.to(accelerator.device)).images
                run.logger.image_pairs(f"{split}/input_vs_reconstruction", images, recon, step)
    run.logger.scalars(results, step)
    return results
