"""Validation of the autoencoder (stages 1 and 2) and the one averager every stage validates with.

What the official validation logs (`projects/illm/image_module.py`, `log_quality_metrics` and
`on_validation_epoch_end`; the stages' `eval_step`), over the whole validation split, and how it
is computed here:

- `val/psnr`, `val/mse`: pooled over the split as torchmetrics' `PeakSignalNoiseRatio` and
  `MeanSquaredError` pool them (the summed squared error of the 8-bit images over all pixels);
  the mean of the per-image PSNRs is `val/psnr_per_image_mean`.
- `val/hific_distortion`: 0.075 * 2**-5 * `val/mse` + `val/lpips` (image_module.py:51-52, 166-168).
- `val/fid`: Inception features of the whole reconstructions against the originals
  (torchmetrics' `FrechetInceptionDistance`, image_module.py:39, 169-174, 232), from float64
  feature moments gathered over the processes.
- `val/total_loss` (stage 1) or `val/total_model_loss` and `val/generator_loss` (stage 2): the
  training objective on the eval-mode (rounded) forward, with `val/distortion_loss`,
  `val/rate_loss`, the bpp terms (`val/total_bpp`, `val/quantized_total_bpp`, ...), `val/target`
  and `val/lam2` under the official names.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from illm import metrics
from illm.errors import MissingWeightsError
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


# The official `hific_distortion` weights (image_module.py:51-52): MSE on the 0..255 scale, LPIPS.
HIFIC_MSE_WEIGHT = 0.075 * 2**-5
HIFIC_LPIPS_WEIGHT = 1.0


class SampleMeans:
    """Per-image values averaged over the images of every process, each image counted once.

    Every process adds batches of one shape (unreadable images masked out by `valid`, never
    dropped: a collective with one process's batch shorter, or skipped, would fail or hang).
    Accelerate evens out the validation shards by repeating samples on the last batch;
    `gather_for_metrics` drops those repeats, which a sum-then-`reduce` would count.
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, Tensor], valid: Tensor) -> None:
        """`values`: name -> one value per image of this process's batch; `valid`: the images that
        count. One collective for all of them."""
        columns = [value.detach().double().reshape(-1) for value in values.values()]
        rows = self.gather_valid(torch.stack(columns, dim=1), valid)
        for index, name in enumerate(values):
            self.sums[name] = self.sums.get(name, 0) + rows[:, index].sum()
            self.counts[name] = self.counts.get(name, 0) + rows.shape[0]

    def gather_valid(self, values: Tensor, valid: Tensor) -> Tensor:
        """The valid rows of every process's `values` (B x ...), without the repeats."""
        gathered = self.accelerator.gather_for_metrics(values.contiguous())
        # as uint8: every backend gathers bytes
        keep = self.accelerator.gather_for_metrics(valid.to(values.device, torch.uint8).contiguous())
        return gathered[keep.bool()]

    def means(self) -> dict[str, float]:
        return {name: (self.sums[name] / self.counts[name]).item() for name in self.sums if self.counts[name]}


def validation_images(val_loader):
    """(images, valid) of every validation batch, masked batches included: every process runs
    the same collectives, whatever files it could not read."""
    for batch in val_loader:
        valid = batch.valid
        if valid is None:
            valid = torch.ones(batch.images.shape[0], dtype=torch.bool)
        yield batch.images, valid


def image_quality(reconstruction: Tensor, images: Tensor, lpips) -> dict[str, Tensor]:
    """Per-image quality of a reconstruction clamped to [0, 1]: `val/mse` (8-bit images, 0..255
    scale), `val/psnr_per_image_mean`, `val/ms_ssim` (images large enough) and `val/lpips` (with a
    network). `pooled_quality` turns their means into the split's `val/psnr`."""
    mse = metrics.mse_255(reconstruction, images)
    quality = {"val/mse": mse, "val/psnr_per_image_mean": metrics.psnr_of_mse(mse)}
    if min(images.shape[-2:]) >= metrics.MS_SSIM_MIN_SIDE:
        quality["val/ms_ssim"] = metrics.ms_ssim(reconstruction, images)
    if lpips is not None:
        quality["val/lpips"] = lpips(reconstruction, images).flatten()
    return quality


def pooled_quality(results: dict[str, float]) -> dict[str, float]:
    """`results` with the split's `val/psnr`: the PSNR of the pooled MSE (every validation image
    has the same size, so the mean of the per-image MSEs is the pooled one)."""
    if "val/mse" in results:
        results["val/psnr"] = metrics.psnr_of_mse(
            torch.tensor(results["val/mse"], dtype=torch.float64)
        ).item()
    return results


# --- FID -------------------------------------------------------------------------------------------


def build_fid(fid_cfg, needed: bool) -> nn.Module | None:
    """The Inception-v3 of `val/fid` (`fid` config section), or None; stops at start when the
    pretrained weights are unavailable."""
    if not (needed and fid_cfg.enabled):
        return None
    try:
        return metrics.inception_network(random_backbone=fid_cfg.backbone_weights == "random")
    except MissingWeightsError as error:
        hint = 'or set fid.backbone_weights="random" (a val/fid that is not comparable) or fid.enabled=false'
        raise MissingWeightsError(f"{error} ({hint})") from None


class FIDAccumulator:
    """Feature moments of the originals and of the reconstructions over every process's valid
    images: memory independent of the number of images."""

    def __init__(self, network: nn.Module, averages: SampleMeans):
        self.network = network
        self.averages = averages
        self.real = metrics.FeatureMoments()
        self.fake = metrics.FeatureMoments()

    def add(self, originals: Tensor, reconstructions: Tensor, valid: Tensor) -> None:
        """Both in [0, 1]; rounded to 8 bits as the official `image_to_255_scale(..., uint8)`."""
        real = self.network(metrics.to_255(originals).to(torch.uint8))
        fake = self.network(metrics.to_255(reconstructions).to(torch.uint8))
        features = self.averages.gather_valid(torch.cat([real, fake], dim=1), valid)
        self.real.add(features[:, : real.shape[1]])
        self.fake.add(features[:, real.shape[1] :])

    def compute(self) -> float | None:
        """The FID, or None with fewer than 2 images (no covariance)."""
        if self.real.count < 2:
            return None
        return metrics.frechet_distance_of_moments(self.real, self.fake)


# --- stages 1 and 2 --------------------------------------------------------------------------------


@dataclass
class Adversarial:
    """What stage 2 adds to the validation: its discriminator, the real classes of the image
    patches (`PatchTargets`) and the generator loss weight."""

    discriminator: nn.Module
    targets: Callable[[Tensor], Tensor]
    weight: float


@dataclass
class AutoencoderValidation:
    """A stage's validation of its autoencoder: all that `validate_autoencoder` needs besides the
    model and the step."""

    run: object
    val_loader: object
    distortion: Distortion
    lpips: nn.Module | None
    rate_cfg: object
    fixed: dict
    fid: nn.Module | None = None
    adversarial: Adversarial | None = None

    def __call__(self, model, step: int) -> dict:
        return validate_autoencoder(
            self.run,
            model,
            self.val_loader,
            self.distortion,
            self.lpips,
            self.rate_cfg,
            step,
            self.fixed,
            self.fid,
            self.adversarial,
        )


def validate_autoencoder(
    run,
    model,
    val_loader,
    distortion: Distortion,
    lpips,
    rate_cfg,
    step: int,
    fixed: dict,
    fid: nn.Module | None = None,
    adversarial: Adversarial | None = None,
) -> dict:
    """Eval-mode (rounded) metrics over the validation set, averaged over all processes;
    logs them and the fixed images' reconstructions. `fid`: the Inception network of `val/fid`;
    `adversarial`: stage 2's discriminator, for `val/generator_loss`."""
    accelerator = run.accelerator
    unwrapped = accelerator.unwrap_model(model)
    networks = [unwrapped]
    if adversarial is not None:
        networks.append(accelerator.unwrap_model(adversarial.discriminator))
    averages = SampleMeans(accelerator)
    fid_statistics = FIDAccumulator(fid, averages) if fid is not None else None
    with evaluating(*networks):
        for images, valid in validation_images(val_loader):
            with accelerator.autocast():
                out = unwrapped(images)
            per_image = objective_per_image(
                run.config, out, images, distortion, rate_cfg, step, networks, adversarial
            )
            recon = out.images.float().clamp(0, 1)
            per_image.update(image_quality(recon, images, lpips))
            averages.add(per_image, valid)
            if fid_statistics is not None:
                fid_statistics.add(images, recon, valid)
        results = pooled_quality(averages.means())
        if "val/lpips" in results:
            results["val/hific_distortion"] = (
                HIFIC_MSE_WEIGHT * results["val/mse"] + HIFIC_LPIPS_WEIGHT * results["val/lpips"]
            )
        if results:
            results["val/target"], results["val/lam2"] = rate_schedule(rate_cfg, step)
        if fid_statistics is not None and (value := fid_statistics.compute()) is not None:
            results["val/fid"] = value
        for split, fixed_images in fixed.items():
            if fixed_images is not None:
                fixed_images = fixed_images.to(accelerator.device)
                recon = unwrapped(fixed_images).images
                run.logger.image_pairs(f"{split}/input_vs_reconstruction", fixed_images, recon, step)
    run.logger.scalars(results, step)
    return results


def objective_per_image(
    cfg, out, images: Tensor, distortion: Distortion, rate_cfg, step: int, networks, adversarial
) -> dict[str, Tensor]:
    """The training objective's terms per image, on the unclamped reconstruction as the official
    `eval_step` computes them: their means over the images are the batch losses of training."""
    reconstruction = out.images.float()
    mse = (reconstruction - images).pow(2).flatten(1).mean(1)
    terms = {"mse": mse}
    if distortion.lpips is not None:
        terms["lpips"] = distortion.lpips(reconstruction, images)
    distortion_loss = distortion.mse_weight * mse
    if "lpips" in terms:
        distortion_loss = distortion_loss + distortion.lpips_weight * terms["lpips"]
    target, lam_above = rate_schedule(rate_cfg, step)
    num_pixels = images.shape[-2] * images.shape[-1]
    rate = rate_loss(
        out.likelihoods, out.rounded_likelihoods, num_pixels, target, rate_cfg.lam_below, lam_above
    )
    # per image, the weights `targeted_rate` averages over the batch
    rate_per_image = torch.where(rate.rounded_bpp > target, lam_above, rate_cfg.lam_below) * rate.bpp
    total = cfg.distortion.lam * distortion_loss + rate_per_image
    per_image = {
        "val/distortion_loss": distortion_loss,
        "val/rate_loss": rate_per_image,
        **{f"val/distortion_{name}": value for name, value in terms.items()},
        # the official names (eval mode: both likelihoods are those of the rounded values)
        "val/total_bpp": rate.bpp,
        "val/quantized_total_bpp": rate.rounded_bpp,
        "val/latent_bpp": rate.latent_bpp,
        "val/quantized_latent_bpp": rate.rounded_latent_bpp,
        "val/hyper_bpp": rate.hyper_bpp,
        "val/quantized_hyper_bpp": rate.rounded_hyper_bpp,
    }
    if adversarial is None:
        per_image["val/total_loss"] = total
        return per_image
    discriminator = networks[-1]
    targets = adversarial.targets(images)
    logits = discriminator(out.images.float(), out.latent.float())  # float32 weights, outside autocast
    generator = F.cross_entropy(logits.float(), targets, reduction="none").flatten(1).mean(1)
    per_image["val/generator_loss"] = generator
    per_image["val/total_model_loss"] = total + adversarial.weight * generator
    return per_image
