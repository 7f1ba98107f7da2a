"""The training scripts' command line and the result of one training iteration."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from torch import Tensor

from illm import metrics
from illm.errors import IllmError


def run_main(main, argv=None) -> None:
    """Run a stage's `main`, turning user errors into one line on stderr and exit code 1."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except IllmError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def parse_args(argv: list[str], usage: str) -> tuple[str | None, list[str]]:
    """`CONFIG.toml [section.key=value ...]`: the config path and the overrides."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        sys.exit(0 if argv else 2)
    path, overrides = argv[0], argv[1:]
    if "=" in path:
        raise IllmError(f"the first argument must be a config file, got '{path}'")
    return path, overrides


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
