"""Seconds per stage-1 iteration of a recipe (default: full-size 0.14 bpp) on this machine.

    python scripts/benchmark_pretrain.py [configs/0.14bpp.toml] [--batch 2] [--steps 3] [--rounds 2] [--device cpu]

One iteration is exactly what the trainer runs (`illm.stages.pretrain.pretrain_iteration`):
forward, distortion (MSE + LPIPS), rate, backward, clip, AdamW and schedule step, then the
quantile loss and its optimizer. LPIPS runs with a
random backbone here (same cost as the pretrained one). Variants of the config
(`--variants`: the released one, channels-last + fused AdamW, and that in bf16) take turns,
each timed on freshly built parts after one warm-up iteration; medians and ratios to the first
variant are printed.
"""

import argparse
import statistics
import time

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from illm.config import load_config
from illm.experiment import PretrainConfig
from illm.losses import build_distortion
from illm.metrics import lpips_network
from illm.stages.pretrain import build_autoencoder, build_parts, pretrain_iteration


def fresh_parts(cfg, distortion, device):
    """The stage-1 iteration's parts, as `illm.stages.pretrain.train` builds them (one process)."""
    AcceleratorState._reset_state()  # a new precision per measurement, in one process
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=device.type == "cpu")
    torch.manual_seed(0)
    return build_parts(cfg, accelerator, build_autoencoder(cfg.model).train(), distortion)


VARIANTS = {
    "official": [],
    "fast": ["train.channels_last=true", "train.fused_optimizer=true"],
    "fast-bf16": ["train.channels_last=true", "train.fused_optimizer=true", 'train.mixed_precision="bf16"'],
}


def time_iterations(cfg, distortion, device, images, steps: int) -> list[float]:
    """Seconds of `steps` iterations after one warm-up, on freshly built parts."""
    parts = fresh_parts(cfg, distortion, device)
    seconds = []
    for step in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        pretrain_iteration(parts, [images], step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first iteration warms up allocators and kernels
            seconds.append(time.perf_counter() - start)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default="configs/0.14bpp.toml")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed iterations per variant and round")
    parser.add_argument("--rounds", type=int, default=2, help="the variants take turns this many times")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"a comma list of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    device = torch.device(args.device)
    names = args.variants.split(",")
    configs = {name: load_config(PretrainConfig, args.config, VARIANTS[name]) for name in names}
    base = configs[names[0]]
    distortion = build_distortion(base.distortion, lpips_network(base.lpips.net, random_backbone=True)).to(device)
    images = torch.rand(args.batch, 3, base.data.crop_size, base.data.crop_size, device=device)
    print(f"{args.config}: batch {args.batch} x {base.data.crop_size}^2 on {device} ({torch.get_num_threads()} threads)")
    seconds = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            seconds[name] += time_iterations(configs[name], distortion, device, images, args.steps)
    reference = statistics.median(seconds[names[0]])
    for name in names:
        median = statistics.median(seconds[name])
        print(
            f"  {name:10s} {' '.join(VARIANTS[name]) or '(the released config)'}\n"
            f"             median {median:.2f} s/iteration (min {min(seconds[name]):.2f}, max {max(seconds[name]):.2f},"
            f" {len(seconds[name])} iterations): {median / reference:.2f}x of {names[0]}"
        )


if __name__ == "__main__":
    main()
