"""Seconds per stage-1 iteration of a recipe (default: full-size 0.14 bpp) on this machine.

    python scripts/benchmark_pretrain.py [configs/0.14bpp.toml] [--batch 2] [--steps 6] [--device cpu]

One iteration is exactly what the trainer runs (`illm.stages.pretrain.pretrain_iteration`):
forward, distortion (MSE + LPIPS), rate, backward, clip, AdamW and schedule step, then the
quantile loss and its optimizer. LPIPS runs with a
random backbone here (same cost as the pretrained one). Reports the median over `--steps`
after one warm-up iteration, in float32 and in bf16 autocast.
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
from illm.optimizer import adamw, lr_schedule
from illm.stages.pretrain import PretrainParts, build_autoencoder, pretrain_iteration


def build_parts(cfg, distortion, precision: str, device) -> PretrainParts:
    """The stage-1 iteration's parts, as `illm.stages.pretrain.train` builds them (one process)."""
    AcceleratorState._reset_state()  # a new precision per measurement, in one process
    accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
    torch.manual_seed(0)
    model = build_autoencoder(cfg.model).to(device).train()
    optimizer = adamw(model.main_parameters(), cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas)
    aux_optimizer = adamw(model.aux_parameters(), cfg.optim.aux_lr, cfg.optim.aux_weight_decay)
    scheduler = lr_schedule(optimizer, cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.decay_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    return PretrainParts(cfg, accelerator, model, optimizer, scheduler, aux_optimizer, distortion)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default="configs/0.14bpp.toml")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", default="no,bf16")
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = load_config(PretrainConfig, args.config)
    lpips = lpips_network(cfg.lpips.net, random_backbone=True)
    distortion = build_distortion(cfg.distortion, lpips).to(device)
    print(f"{args.config}: batch {args.batch} x {cfg.data.crop_size}^2 on {device} ({torch.get_num_threads()} threads)")
    for precision in args.precisions.split(","):
        parts = build_parts(cfg, distortion, precision, device)
        images = torch.rand(args.batch, 3, cfg.data.crop_size, cfg.data.crop_size, device=device)
        seconds = []
        for step in range(args.steps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            pretrain_iteration(parts, [images], step)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step:  # the first iteration warms up allocators and kernels
                seconds.append(time.perf_counter() - start)
        label = "float32" if precision == "no" else precision
        print(f"  {label:8s} median {statistics.median(seconds):.2f} s/iteration (min {min(seconds):.2f}, max {max(seconds):.2f}, {args.steps} steps)")


if __name__ == "__main__":
    main()
