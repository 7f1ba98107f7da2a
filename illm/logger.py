"""TensorBoard logging: event files under `<run>/tensorboard`, written by the main process only."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torchvision.utils import make_grid


class TensorBoardLogger:
    """A SummaryWriter on the main process; on other processes every call does nothing."""

    def __init__(self, run_dir: str | Path, enabled: bool, purge_step: int | None = None):
        """`purge_step`: a resumed run's first step; events at or after it (logged by the run
        before it was interrupted) are dropped."""
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge_step)

    def scalars(self, values: dict[str, float | Tensor], step: int) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if isinstance(value, Tensor):
                value = value.detach().float().mean().item()
            self.writer.add_scalar(name, value, step)

    def image_pairs(self, tag: str, originals: Tensor, reconstructions: Tensor, step: int) -> None:
        """One grid per tag: each row an input next to its reconstruction.

        Both must be on one device, on every process (not only the one that writes): a grid of
        CPU inputs and accelerator outputs would fail on the main process alone.
        """
        if originals.device != reconstructions.device:
            raise ValueError(
                f"image_pairs {tag!r}: originals on {originals.device}, reconstructions on "
                f"{reconstructions.device}; move both to one device"
            )
        if self.writer is None:
            return
        rows = torch.stack([originals, reconstructions], dim=1).flatten(0, 1)
        grid = make_grid(rows.float().clamp(0, 1).cpu(), nrow=2, padding=2)
        self.writer.add_image(tag, grid, step)

    def image(self, tag: str, image: Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image.float().clamp(0, 1).cpu(), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
