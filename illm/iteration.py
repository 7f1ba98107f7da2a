"""What one training iteration hands to its loop and to the golden tests.

An iteration function runs one optimizer step over its micro-batches and returns an
`IterationResult`. Its `logs` are this process's means over those micro-batches, still device
tensors: nothing is synchronised with the host until the loop reduces them
(`illm.step_metrics.reduce_logs`) on an iteration that logs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from illm import metrics
from illm.losses import RateOutput


@dataclass
class ScheduleValues:
    """The rate schedule in force during the iteration."""

    target_bpp: float
    lam_above: float


@dataclass
class DiscriminatorTensors:
    """Stage 2, last micro-batch: the discriminator's targets (VQ label + 1, or 1) and logits."""

    generator_targets: Tensor  # targets of the generator's pass: the compressed images' labels
    real_targets: Tensor  # targets of the real images
    generator_logits: Tensor  # D(x_hat) in the generator pass (discriminator before its step)
    fake_logits: Tensor  # D(x_hat.detach()) in the discriminator pass
    real_logits: Tensor  # D(x_real) in the discriminator pass


@dataclass
class IterationResult:
    """One iteration: its logs and the last micro-batch's tensors (what the golden tests compare)."""

    logs: dict[str, Tensor | float]  # named as the official step logs them; means over the micro-batches
    forward: object  # the model output of the last micro-batch (AutoencoderOutput, VQVAEOutput)
    images: Tensor  # the images that forward received
    rate: RateOutput | None = None  # the rate terms of that forward (stages 1 and 2)
    schedule: ScheduleValues | None = None  # stages 1 and 2
    discriminator: DiscriminatorTensors | None = None  # stage 2


class MicroBatchMeans:
    """Means over the micro-batches of one iteration, kept on the device (no host sync).

    Tensors are summed and divided by the number of micro-batches at the end; plain numbers
    (a schedule's target, a learning rate) are the same for every micro-batch and kept as given.
    """

    def __init__(self, count: int):
        self.count = count
        self.sums: dict[str, Tensor | float] = {}

    def add(self, logs: dict[str, Tensor | float]) -> None:
        for name, value in logs.items():
            if isinstance(value, Tensor):
                value = value.detach()
                self.sums[name] = self.sums[name] + value if name in self.sums else value
            else:
                self.sums[name] = value

    def means(self) -> dict[str, Tensor | float]:
        return {
            name: value / self.count if isinstance(value, Tensor) else value
            for name, value in self.sums.items()
        }


def quality_logs(reconstruction: Tensor, images: Tensor) -> dict[str, Tensor]:
    """What the official step logs of a batch's quality, in a form that pools over micro-batches
    and processes: the mean MSE on the 0-255 scale (`train/psnr` is derived from its mean, as
    torchmetrics pools it) and the mean per-image MS-SSIM where the images are large enough."""
    reconstruction = reconstruction.detach()
    logs = {"train/mse": metrics.mse_255(reconstruction, images).mean()}
    if min(images.shape[-2:]) >= metrics.MS_SSIM_MIN_SIDE:
        logs["train/ms_ssim"] = metrics.ms_ssim(reconstruction.float(), images.float()).mean()
    return logs
