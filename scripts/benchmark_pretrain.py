"""Seconds per stage-1 iteration of a recipe (default: full-size 0.14 bpp) on this machine.

    python scripts/benchmark_pretrain.py [configs/0.14bpp.toml] [--batch 2] [--steps 6] [--device cpu]

One iteration is what the trainer does: forward, distortion (MSE + LPIPS), rate, backward,
clip, AdamW and schedule step, then the quantile loss and its optimizer. LPIPS runs with a
random backbone here (same cost as the pretrained one). Reports the median over `--steps`
after one warm-up iteration, in float32 and in bf16 autocast.
"""

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from illm.config import load_config
from illm.experiment import PretrainConfig
from illm.losses import rate_loss
from illm.metrics import lpips_network
from illm.optimizer import adamw, lr_schedule
from illm.stages.pretrain import build_autoencoder, build_distortion, rate_schedule


def iteration(model, distortion, optimizer, aux_optimizer, scheduler, images, cfg, precision, device):
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    target, lam_above = rate_schedule(cfg.rate, 0)
    with autocast:
        out = model(images)
        dist, _ = distortion(out.images, images)
        rate = rate_loss(out.likelihoods, out.rounded_likelihoods, images.shape[-2] * images.shape[-1], target, cfg.rate.lam_below, lam_above)
        loss = cfg.distortion.lam * dist + rate.loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.main_parameters(), cfg.train.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    model.aux_loss().backward()
    aux_optimizer.step()
    aux_optimizer.zero_grad(set_to_none=True)


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
    distortion = build_distortion(cfg, lpips).to(device)
    print(f"{args.config}: batch {args.batch} x {cfg.data.crop_size}^2 on {device} ({torch.get_num_threads()} threads)")
    for precision in args.precisions.split(","):
        torch.manual_seed(0)
        model = build_autoencoder(cfg.model).to(device).train()
        optimizer = adamw(model.main_parameters(), cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas)
        aux_optimizer = adamw(model.aux_parameters(), cfg.optim.aux_lr)
        scheduler = lr_schedule(optimizer, cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.decay_steps)
        images = torch.rand(args.batch, 3, cfg.data.crop_size, cfg.data.crop_size, device=device)
        seconds = []
        for step in range(args.steps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            iteration(model, distortion, optimizer, aux_optimizer, scheduler, images, cfg, precision, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step:  # the first iteration warms up allocators and kernels
                seconds.append(time.perf_counter() - start)
        label = "float32" if precision == "no" else precision
        print(f"  {label:8s} median {statistics.median(seconds):.2f} s/iteration (min {min(seconds):.2f}, max {max(seconds):.2f}, {args.steps} steps)")


if __name__ == "__main__":
    main()
