"""Seconds per stage-1 iteration of a recipe (default: full-size 0.14 bpp) on this machine.

    python scripts/benchmark_pretrain.py [configs/0.14bpp.toml] [--batch 2] [--steps 3] [--rounds 2]
        [--device cpu] [--official-path DIR]

One iteration is exactly what the trainer runs (`illm.stages.pretrain.pretrain_iteration`):
forward, distortion (MSE + LPIPS), rate, backward, clip, AdamW and schedule step, then the
quantile loss and its optimizer. LPIPS runs with a random backbone (same cost as the
pretrained one). The variants (`--variants`) take turns, each timed on freshly built parts
after one warm-up iteration:

- `plain`: our iteration without channels-last tensors and with torch's default AdamW;
- `released`: the released config (channels-last, fused AdamW), float32;
- `released-bf16`: the same under bf16 autocast;
- with `--official-path DIR` (the `neuralcompression` 0.3.1 package installed with `pip install
  --no-deps --target DIR`, never into this environment), first the official step on
  neuralcompression's own autoencoder and LPIPS, with the same weights.

Medians and ratios to the first variant are printed.
"""

import argparse
import math
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
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
    "plain": ["train.channels_last=false", "train.fused_optimizer=false"],
    "released": [],
    "released-bf16": ['train.mixed_precision="bf16"'],
}
OFFICIAL = "neuralcompression"


def time_iterations(iterate, device, steps: int) -> list[float]:
    """Seconds of `steps` calls of `iterate(step)` after one warm-up call."""
    seconds = []
    for step in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        iterate(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first iteration warms up allocators and kernels
            seconds.append(time.perf_counter() - start)
    return seconds


def ours(cfg, distortion, device, images):
    parts = fresh_parts(cfg, distortion, device)
    return lambda step: pretrain_iteration(parts, [images], step)


def official(path: Path, cfg, device, images):
    """The official stage-1 step (`TargetRateCompressionModule.training_step` without its
    Lightning logging) on neuralcompression's HiFiCAutoencoder and `NormFixLPIPS`, with the same
    weights as ours: its model, loss, rate, AdamW, clipping and schedule, in plain PyTorch."""
    from benchmark_codec import official_autoencoder  # the same scripts folder

    torch.manual_seed(0)
    model = official_autoencoder(path, build_autoencoder(cfg.model).state_dict()).train().to(device)
    from neuralcompression.loss_fn._normfix_lpips import NormFixLPIPS
    from neuralcompression.optim import RampCosineLRSchedule

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lpips = NormFixLPIPS(net=cfg.lpips.net, pnet_rand=True, verbose=False).eval().to(device)
    lpips.requires_grad_(False)
    model_params, quantile_params = model.collect_parameters()
    model_opt = torch.optim.AdamW(model_params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    quantile_opt = torch.optim.AdamW(quantile_params, lr=cfg.quantiles.lr)
    schedule = RampCosineLRSchedule(model_opt, cfg.optim.warmup_steps, cfg.optim.decay_steps)
    pixels = images.shape[-2] * images.shape[-1]
    target, lam_below, lam_above = cfg.rate.target_bpp, cfg.rate.lam_below, cfg.rate.lam_above

    def bpp(likelihoods):
        return likelihoods.view(likelihoods.shape[0], -1).log().sum(1) / -math.log(2) / pixels

    def iterate(step):
        out = model(images)
        distortion = cfg.distortion.mse_weight * F.mse_loss(out.image, images)
        distortion = (
            distortion + cfg.distortion.lpips_weight * lpips(out.image, images, normalize=True).mean()
        )
        total_bpp = bpp(out.latent_likelihoods) + bpp(out.hyper_latent_likelihoods)
        quantized_bpp = bpp(out.quantized_latent_likelihoods) + bpp(out.quantized_hyper_latent_likelihoods)
        lams = torch.where(quantized_bpp > target, lam_above, lam_below)
        loss = distortion + (lams * total_bpp).mean()
        model_opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model_params, cfg.train.grad_clip)
        model_opt.step()
        schedule.step()
        quantile_loss = model.hyper_bottleneck.loss()
        quantile_opt.zero_grad()
        quantile_loss.backward()
        quantile_opt.step()

    return iterate


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default="configs/0.14bpp.toml")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed iterations per variant and round")
    parser.add_argument("--rounds", type=int, default=2, help="the variants take turns this many times")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"a comma list of {', '.join(VARIANTS)}"
    )
    parser.add_argument("--official-path", type=Path, help="folder with the neuralcompression 0.3.1 package")
    args = parser.parse_args()
    device = torch.device(args.device)
    names = ([OFFICIAL] if args.official_path else []) + args.variants.split(",")
    configs = {name: load_config(PretrainConfig, args.config, VARIANTS.get(name, [])) for name in names}
    base = configs[names[0]]
    distortion = build_distortion(base.distortion, lpips_network(base.lpips.net, random_backbone=True)).to(
        device
    )
    images = torch.rand(args.batch, 3, base.data.crop_size, base.data.crop_size, device=device)
    print(
        f"{args.config}: batch {args.batch} x {base.data.crop_size}^2 on {device} "
        f"({torch.get_num_threads()} threads)"
    )
    seconds = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            if name == OFFICIAL:
                iterate = official(args.official_path, base, device, images)
            else:
                iterate = ours(configs[name], distortion, device, images)
            seconds[name] += time_iterations(iterate, device, args.steps)
            del iterate
    reference = statistics.median(seconds[names[0]])
    for name in names:
        median = statistics.median(seconds[name])
        what = "the official step" if name == OFFICIAL else " ".join(VARIANTS[name]) or "the released config"
        print(
            f"  {name:17s} {what}\n"
            f"                    median {median:.2f} s/iteration (min {min(seconds[name]):.2f}, max "
            f"{max(seconds[name]):.2f},"
            f" {len(seconds[name])} iterations): {median / reference:.2f}x of {names[0]}"
        )


if __name__ == "__main__":
    main()
