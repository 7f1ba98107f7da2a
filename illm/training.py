"""The training scripts' command line and the result of one training iteration."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from illm import metrics


@dataclass
class IterationResult:
    """What a stage's iteration function returns to the loop (and to the golden tests)."""

    logs: dict  # the iteration's scalars (tensors or floats), named as the official step logs them
    out: object  # the model forward of the last micro-batch
    images: Tensor  # the images that forward reconstructed
    extras: dict = field(default_factory=dict)  # stage-specific tensors (labels, logits)

    def all_logs(self) -> dict:
        return {**self.logs, **self.quality()}

    def quality(self) -> dict:
        """PSNR, MSE and MS-SSIM of the reconstruction, as the official step logs them (computed
        on demand: MS-SSIM is not free)."""
        quality = metrics.training_quality(self.out.images.detach(), self.images)
        return {f"train/{name}": value for name, value in quality.items()}
