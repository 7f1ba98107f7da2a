"""Seconds per stage-2 iteration at full size: the official HiFiC, discriminator and VQ-VAE
architectures (random weights), batch 4 split 2/2, 256x256 crops, on this machine's device.

    python scripts/benchmark_finetune.py [--steps 5] [--variants plain released released-bf16] [--threads N]

It runs the real stage-2 loop (`illm.stages.finetune.train`, the 0.14 bpp config, MSE + LPIPS
with an untrained AlexNet, which costs the same as the pretrained one) for a few iterations per
config variant (channels-last and fused AdamW off; the released config; that in bf16) in a
temporary folder, and prints the median of the logged `perf/step_seconds`, leaving out the
first (warm-up) iteration, with ratios to the first variant.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from illm.config import load_config
from illm.experiment import FinetuneConfig
from illm.models.hific import HiFiCAutoencoder
from illm.models.vqvae import VQVAE
from illm.stages.finetune import train

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/finetune_0.14bpp.toml"
sys.path.insert(0, str(REPO / "tests"))  # the photo-like images of the test suite
from helpers.synthetic import synthetic_images  # noqa: E402


def step_seconds(run_dir: Path) -> list[float]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [event.value for event in events.Scalars("perf/step_seconds")]


VARIANTS = {
    "plain": ["train.channels_last=false", "train.fused_optimizer=false"],
    "released": [],
    "released-bf16": ['train.mixed_precision="bf16"'],
}


def benchmark(workdir: Path, variant: str, steps: int) -> list[float]:
    """Per-iteration seconds of `steps` timed iterations (after one warm-up) of a config variant."""
    run_dir = workdir / f"run_{variant}"
    overrides = [
        f"data.train={workdir / 'images'}",
        "data.val=",
        "data.batch_size=4",
        "data.global_batch_size=4",
        "data.num_workers=0",
        f"run.dir={run_dir}",
        f"init.autoencoder={workdir / 'autoencoder.pt'}",
        f"init.labeller={workdir / 'vqvae.pt'}",
        f"train.max_steps={steps + 1}",
        *VARIANTS[variant],
        "logging.every=1",
        "checkpoint.every=1000000",
        'lpips.backbone_weights="random"',
    ]
    train(load_config(FinetuneConfig, CONFIG, overrides))
    return step_seconds(run_dir)[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=int, default=5, help="timed iterations per variant (after one warm-up)"
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {}
    with tempfile.TemporaryDirectory(prefix="illm-benchmark-") as tmp:
        workdir = Path(tmp)
        synthetic_images(workdir / "images", 8, (256, 256), seed=0)
        torch.manual_seed(0)
        torch.save(HiFiCAutoencoder().state_dict(), workdir / "autoencoder.pt")
        torch.save(VQVAE().state_dict(), workdir / "vqvae.pt")
        for variant in args.variants:
            results[variant] = benchmark(workdir, variant, args.steps)

    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\nstage 2, full size, batch 4 (2 compressed + 2 real), 256x256, {device}:")
    reference = statistics.median(results[args.variants[0]])
    for variant, seconds in results.items():
        median = statistics.median(seconds)
        print(
            f"  {variant:10s} median {median:7.2f} s/iteration, {median / reference:.2f}x of "
            f"{args.variants[0]}"
            f"  (steps: {', '.join(f'{s:.2f}' for s in seconds)}; "
            f"{' '.join(VARIANTS[variant]) or 'the released config'})"
        )


if __name__ == "__main__":
    main()
