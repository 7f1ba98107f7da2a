"""The GPU readiness checks of issue 18, run by scripts/gpu_check.sh on one CUDA machine.

    python scripts/gpu_check.py OUT [--device cuda|cpu] [--quick] [--only NAME,...] [--budget SECONDS]

Each check runs in a child process of its own (a CUDA error or a hang cannot take the others
with it) under a time limit; the checks share one work folder. OUT receives three files:
summary.md (a table: check, pass/fail/skip, seconds, figures), summary.json (the same, for
scripts) and log.txt (every child's output). ``--quick`` makes the full-size checks tiny and
times one iteration: with ``--device cpu`` it tests this script's logic on a CPU in minutes.
Exit status: 0 when no check failed, 1 otherwise.

The checks, in the order they run (the cheap and decisive ones first):

- environment: versions, GPUs, bf16 support;
- codec_reference (points 2, 6): the file of tests/reference/codec_v1 encoded on the device in
  fp32 and bf16 and decoded on the CPU, and the reference file decoded on the device, against
  its bytes and its decoded image;
- coder_tables (point 2): tables of a full-size model on the device equal the CPU-built ones;
  what tables built with the device's arithmetic would have been; the cached hyperprior copy;
- stage1_validation (point 1): a tiny stage-1 run on the device through a validation;
- tiny_stages_bf16_resume: tiny stage 0, 1 and 2 in bf16, stage 2 stopped and resumed;
- ddp_world1: the DDP code path at world size 1 (torchrun; NCCL on CUDA), with validation;
- ddp_world2: two ranks on NCCL, when two GPUs are present;
- fp16 (point 5): LPIPS normalisations and channel norms under float16 autocast, tiny stage 0
  and 1 in fp16;
- tf32_latent (point 6): a full-size encoder's latent on the device with TF32 off and on
  against the CPU's;
- stage1_timing: full-size stage-1 iterations, fp32 and bf16, cudnn.benchmark off and on,
  with peak memory (scripts/benchmark_pretrain.py's parts and timer);
- stage2_timing: full-size stage-2 iterations at the released per-process batch
  (scripts/benchmark_finetune.py's run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
TINY = REPO / "illm" / "configs" / "tiny"
REFERENCE = REPO / "tests" / "reference" / "codec_v1"
LAYOUT_WARNING = "Grad strides do not match bucket view strides"


class Context:
    """What a check gets: the device, quick mode, the shared work folder."""

    def __init__(self, device: str, quick: bool, work: Path):
        self.device, self.quick, self.work = device, quick, work

    @property
    def torch_device(self):
        import torch

        return torch.device(self.device)

    def synchronize(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def reset_peak_memory(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_memory_gb(self) -> float | None:
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.device == "cuda" else None


class Skip(Exception):
    """A check that does not apply here (its message says why)."""


# --- shared pieces ------------------------------------------------------------------------------


def images_folder(ctx: Context, name: str, count: int, size: tuple[int, int], seed: int) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from helpers.synthetic import synthetic_images

    folder = ctx.work / name
    if not folder.is_dir() or len(list(folder.iterdir())) < count:
        synthetic_images(folder, count, size, seed=seed)
    return folder


def scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [event.value for event in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def checkpoint_steps(run_dir: Path) -> list[int]:
    from illm.checkpoint import read_checkpoint, step_checkpoints

    return [read_checkpoint(path)["step"] for path in step_checkpoints(run_dir)]


def astronaut_crop():
    """The crop of scikit-image's astronaut that tests/reference/codec_v1 holds, as floats."""
    import torch
    from skimage import data

    from illm import images

    return images.to_float(torch.from_numpy(data.astronaut()[100:196, 180:308].copy()).permute(2, 0, 1))


def level_differences(a, b) -> tuple[int, float]:
    """Max and mean absolute difference in 8-bit levels between two float images in [0, 1]."""
    from illm import images

    difference = (images.to_uint8(a).int() - images.to_uint8(b).int()).abs()
    return int(difference.max()), round(float(difference.float().mean()), 4)


def latent_of_file(model, data: bytes):
    """The (CPU float32) latent a .illm file codes, as `model`'s entropy coder decodes it."""
    from illm import codec

    header = codec.read_header(data)
    payload = bytes(data[11:-4])
    return model._entropy_coder().decode(
        payload, payload[::-1], model.hyper_size(header.height, header.width)
    )


def full_size_model(ctx: Context, seed: int = 0):
    """A HiFiC autoencoder (full size, or tiny in quick mode) with random weights and quantiles
    moved off their initial values, on the CPU in float32."""
    import torch

    from illm.models.hific import HiFiCAutoencoder

    torch.manual_seed(seed)
    if ctx.quick:
        model = HiFiCAutoencoder(16, 16, (16, 24, 32, 48, 64), 2)
    else:
        model = HiFiCAutoencoder()
    with torch.no_grad():
        quantiles = model.hyper_bottleneck.quantiles
        quantiles.add_(torch.rand_like(quantiles) * 3.3)
    return model.eval()


def tables(model) -> dict:
    names = {
        "hyper_bottleneck": ("_quantized_cdf", "_offset", "_cdf_length"),
        "latent_bottleneck": ("_quantized_cdf", "_offset", "_cdf_length", "scale_table"),
    }
    return {
        f"{module}.{name}": getattr(getattr(model, module), name).detach().cpu()
        for module, table_names in names.items()
        for name in table_names
    }


def median(values: list[float]) -> float:
    return round(statistics.median(values), 4) if values else math.nan


# --- the checks -----------------------------------------------------------------------------------


def check_environment(ctx: Context) -> dict:
    import accelerate
    import torch

    figures = {
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "python": sys.version.split()[0],
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        figures.update(
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            nccl=".".join(map(str, torch.cuda.nccl.version())),
            gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            capability=".".join(map(str, torch.cuda.get_device_capability())),
            bf16_supported=torch.cuda.is_bf16_supported(),
            memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        )
    import compressai

    figures["compressai"] = compressai.__version__
    return {"passed": ctx.device == "cpu" or torch.cuda.is_available(), "figures": figures}


def check_codec_reference(ctx: Context) -> dict:
    """Files encoded on the device decode on the CPU, and match the CPU's files (fp32: the
    reference file of tests/reference/codec_v1; bf16: the CPU's bf16 file); the reference file
    decodes on the device to the reference image."""
    from illm import codec, images, zoo

    weights, reference_file = REFERENCE / "weights.pt", (REFERENCE / "photo.illm").read_bytes()
    expected = images.to_float(images.read_image(REFERENCE / "decoded.png"))
    photo = astronaut_crop()
    cpu_model, model_id = zoo.load_for_coding(weights, "cpu", "fp32")
    cpu_files = {"fp32": reference_file}
    cpu_files["bf16"] = codec.compress(
        zoo.load_for_coding(weights, "cpu", "bf16")[0], photo, model_id=model_id
    )
    figures, failures = {}, []
    for precision, cpu_file in cpu_files.items():
        model, _ = zoo.load_for_coding(weights, ctx.device, precision)
        data = codec.compress(model, photo, model_id=model_id)
        cpu_latent = latent_of_file(cpu_model, cpu_file)
        differing = int((latent_of_file(cpu_model, data) != cpu_latent).sum())
        figures[f"{precision}_encode_bytes_equal_cpu"] = data == cpu_file
        figures[f"{precision}_encode_latent_symbols_differing_from_cpu"] = (
            f"{differing} of {cpu_latent.numel()}"
        )
        decoded_on_cpu = codec.decompress(cpu_model, data, model_id=model_id)  # raises if it cannot
        worst, mean = level_differences(
            decoded_on_cpu, codec.decompress(cpu_model, cpu_file, model_id=model_id)
        )
        figures[f"{precision}_encode_cpu_decode_vs_cpu_file_levels_max_mean"] = (worst, mean)
        if precision == "fp32" and differing > max(2, cpu_latent.numel() // 1000):
            failures.append(f"fp32 encoding on {ctx.device} changes {differing} latent symbols")
        if precision == "bf16" and mean >= 2:  # bf16 encoders round differently on every device
            failures.append(f"bf16 encoding on {ctx.device} moves the decoded image by {mean} levels")
        decoded_on_device = codec.decompress(model, reference_file, model_id=model_id)
        worst, mean = level_differences(decoded_on_device, expected)
        figures[f"{precision}_decode_reference_levels_max_mean"] = (worst, mean)
        if precision == "fp32" and not (worst <= 1 and mean < 0.01):
            failures.append(f"fp32 decoding on {ctx.device} is {worst} levels from the reference image")
        if precision == "bf16" and mean >= 2:
            failures.append(
                f"bf16 decoding on {ctx.device} is {mean} levels from the reference image on average"
            )
    return {"passed": not failures, "figures": figures, "note": "; ".join(failures)}


def check_coder_tables(ctx: Context) -> dict:
    """Tables built for a model on the device are the CPU float32 tables; the hyperprior's CPU
    copy is made once."""
    import copy

    import torch

    from illm.models import hific

    model = full_size_model(ctx)
    on_cpu = copy.deepcopy(model)
    on_cpu.update(force=True)
    on_device = model.to(ctx.device)
    on_device.update(force=True)
    built, expected = tables(on_device), tables(on_cpu)
    differing = [name for name in expected if not torch.equal(built[name], expected[name])]
    # what the code before issue 18 did: build with the device's own arithmetic
    device_arithmetic = copy.deepcopy(on_device)
    device_arithmetic.hyper_bottleneck.update(force=True)
    device_arithmetic.latent_bottleneck.update_scale_table(hific.scale_table().to(ctx.device), force=True)
    old = tables(device_arithmetic)
    old_differences = sum(
        int((old[name] != expected[name]).sum())
        for name in expected
        if old[name].shape == expected[name].shape
    )
    old_shapes = [name for name in expected if old[name].shape != expected[name].shape]
    photo = torch.rand(1, 3, 256, 384, generator=torch.Generator().manual_seed(0))
    seconds = []
    for _ in range(3):
        ctx.synchronize()
        start = time.perf_counter()
        on_device.compress(photo)
        ctx.synchronize()
        seconds.append(round(time.perf_counter() - start, 3))
    figures = {
        "tables_differing_from_cpu": differing,
        "device_arithmetic_table_entries_differing": old_differences,
        "device_arithmetic_table_shapes_differing": old_shapes,
        "compress_seconds_first_then_cached": seconds,
    }
    return {"passed": not differing, "figures": figures}


def check_stage1_validation(ctx: Context) -> dict:
    """Point 1: a tiny stage-1 run on the device through one validation with image grids."""
    from illm.stages import pretrain

    train_images = images_folder(ctx, "train_small", 8, (80, 96), seed=0)
    val_images = images_folder(ctx, "val", 2, (192, 192), seed=1)
    run_dir = ctx.work / "stage1_validation"
    pretrain.main(
        [
            str(TINY / "pretrain.toml"),
            f"run.dir={run_dir}",
            f"data.train={train_images}",
            f"data.val={val_images}",
            "train.max_steps=2",
            "logging.val_every=2",
            "logging.every=1",
            "checkpoint.every=2",
            "run.overwrite=true",
        ]
    )
    psnr = scalars(run_dir, "val/psnr")
    steps = checkpoint_steps(run_dir)
    figures = {"val_psnr": [round(value, 3) for value in psnr], "checkpoint_steps": steps}
    return {"passed": bool(psnr) and steps == [2], "figures": figures}


def check_tiny_stages_bf16_resume(ctx: Context) -> dict:
    """Tiny stage 0, 1 and 2 in bf16 on the device; stage 2 stopped after 1 step and resumed."""
    import torch

    from illm.checkpoint import read_checkpoint, step_checkpoints
    from illm.stages import finetune, pretrain, vqvae

    train_images = images_folder(ctx, "train_small", 8, (80, 96), seed=0)
    val_images = images_folder(ctx, "val", 2, (192, 192), seed=1)
    root = ctx.work / "tiny_bf16"
    common = [f"data.train={train_images}", "train.mixed_precision=bf16", "run.overwrite=true"]
    common += ["checkpoint.every=1", "logging.every=1"]
    vqvae.main(
        [str(TINY / "vqvae.toml"), *common, "data.val=", "train.max_steps=2", f"run.dir={root / 'stage0'}"]
    )
    pretrain.main(
        [str(TINY / "pretrain.toml"), *common, "data.val=", "train.max_steps=2", f"run.dir={root / 'stage1'}"]
    )
    stage2 = [
        str(TINY / "finetune.toml"),
        *common,
        f"data.val={val_images}",
        "logging.val_every=2",
        f"init.autoencoder={root / 'stage1'}",
        f"init.labeller={root / 'stage0'}",
    ]
    finetune.main([*stage2, "train.max_steps=2", f"run.dir={root / 'straight'}"])
    finetune.main([*stage2, "train.max_steps=1", f"run.dir={root / 'stopped'}"])
    resumed = [argument for argument in stage2 if argument != "run.overwrite=true"]
    finetune.main([*resumed, "train.max_steps=2", "run.resume=true", f"run.dir={root / 'stopped'}"])
    straight = read_checkpoint(step_checkpoints(root / "straight")[-1])["models"]
    stopped = read_checkpoint(step_checkpoints(root / "stopped")[-1])["models"]
    difference = max(
        float((straight[net][name].float() - stopped[net][name].float()).abs().max())
        for net in straight
        for name in straight[net]
        if straight[net][name].is_floating_point()
    )
    finite = all(
        bool(torch.isfinite(tensor).all())
        for net in stopped.values()
        for tensor in net.values()
        if tensor.is_floating_point()
    )
    losses = scalars(root / "stopped", "train/total_model_loss")
    figures = {
        "resumed_checkpoint_steps": checkpoint_steps(root / "stopped"),
        "straight_vs_resumed_max_abs_weight_difference": difference,
        "stage2_losses": [round(value, 4) for value in losses],
        "stage2_val_psnr": [round(value, 3) for value in scalars(root / "straight", "val/psnr")],
    }
    passed = finite and figures["resumed_checkpoint_steps"] == [1, 2] and all(map(math.isfinite, losses))
    return {"passed": passed, "figures": figures}


def check_fp16(ctx: Context) -> dict:
    """Point 5: under float16 autocast on the device, LPIPS's normalisations (ours and the lpips
    package's) and the channel norm stay finite for zero and large features; tiny stage 0 and 1
    train two steps in fp16 (with the loss scaler on CUDA)."""
    import lpips as lpips_package
    import torch

    from illm.losses import LPIPSLoss
    from illm.metrics import lpips_network
    from illm.models.layers import ChannelNorm2d
    from illm.stages import pretrain, vqvae

    features = torch.rand(2, 16, 3, 3, device=ctx.device) * 4
    features[0, :, 0, 0] = 0.0
    features[1, :, 1, 1] = 300.0  # its square overflows float16
    loss = LPIPSLoss(lpips_network("alex", random_backbone=True)).to(ctx.device)
    norm = ChannelNorm2d(16).to(ctx.device).train()
    activations = torch.randn(2, 16, 5, 5, device=ctx.device) * 1000
    with torch.autocast(ctx.device, dtype=torch.float16):
        finite = {
            "lpips_loss_unit": bool(loss._unit(features.half()).isfinite().all()),
            "lpips_package_normalize": bool(lpips_package.normalize_tensor(features.half()).isfinite().all()),
            "channel_norm": bool(norm(activations.half()).isfinite().all()),
            "channel_norm_channels_last": bool(
                norm(activations.half().contiguous(memory_format=torch.channels_last)).isfinite().all()
            ),
        }
    train_images = images_folder(ctx, "train_small", 8, (80, 96), seed=0)
    root = ctx.work / "fp16"
    common = [f"data.train={train_images}", "data.val=", "train.max_steps=2", "train.mixed_precision=fp16"]
    common += ["run.overwrite=true", "logging.every=1", "checkpoint.every=2"]
    vqvae.main([str(TINY / "vqvae.toml"), *common, f"run.dir={root / 'stage0'}"])
    pretrain.main([str(TINY / "pretrain.toml"), *common, f"run.dir={root / 'stage1'}"])
    losses = {
        "stage0": scalars(root / "stage0", "train/loss"),
        "stage1": scalars(root / "stage1", "train/total_loss"),
    }
    figures = {"finite_under_fp16_autocast": finite, "losses": losses}
    # CPU autocast keeps pow and sum in float16, where the lpips package's own normalisation
    # (stage 0's LPIPS term, validation) gives 0/0; CUDA autocast runs both in float32.
    required = [name for name in finite if ctx.device == "cuda" or name != "lpips_package_normalize"]
    passed = all(finite[name] for name in required)
    passed = passed and all(values and all(map(math.isfinite, values)) for values in losses.values())
    return {"passed": passed, "figures": figures}


def torchrun_pretrain(ctx: Context, processes: int, name: str) -> dict:
    """The tiny stage 1 under torchrun: DDP through Accelerate, NCCL on CUDA (gloo on a CPU)."""
    train_images = images_folder(ctx, "train_small", 8, (80, 96), seed=0)
    val_images = images_folder(ctx, "val", 2, (192, 192), seed=1)
    run_dir = ctx.work / name
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
        str(SCRIPTS / "pretrain.py"),
        str(TINY / "pretrain.toml"),
        f"run.dir={run_dir}",
        f"data.train={train_images}",
        f"data.val={val_images}",
        "train.max_steps=2",
        "logging.val_every=2",
        "checkpoint.every=2",
        "data.batch_size=2",
        "run.overwrite=true",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    if ctx.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    print(result.stdout[-4000:], result.stderr[-4000:], sep="\n")
    summary_line = next((line for line in result.stdout.splitlines() if "processes:" in line), "")
    figures = {
        "exit_status": result.returncode,
        "run_line": summary_line.strip()[-160:],
        "grad_stride_warnings": result.stderr.count(LAYOUT_WARNING),
        "val_psnr": [round(value, 3) for value in scalars(run_dir, "val/psnr")] if run_dir.is_dir() else [],
    }
    passed = (
        result.returncode == 0 and f"processes: {processes}" in summary_line and bool(figures["val_psnr"])
    )
    passed = passed and figures["grad_stride_warnings"] == 0
    return {"passed": passed, "figures": figures}


def check_ddp_world1(ctx: Context) -> dict:
    return torchrun_pretrain(ctx, 1, "ddp_world1")


def check_ddp_world2(ctx: Context) -> dict:
    import torch

    if ctx.device == "cuda" and torch.cuda.device_count() < 2:
        raise Skip(f"{torch.cuda.device_count()} GPU: two ranks need two")
    if ctx.device == "cpu" and ctx.quick:
        raise Skip("on a CPU the test suite runs two gloo processes already")
    return torchrun_pretrain(ctx, 2, "ddp_world2")


def check_tf32_latent(ctx: Context) -> dict:
    """Point 6: the latent of a full-size encoder on the device, TF32 off and on, against the CPU."""
    import torch

    from illm import backends

    model = full_size_model(ctx, seed=1)
    size = (256, 256) if ctx.quick else (512, 768)
    image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model.encoder(image)
        encoder = model.encoder.to(ctx.device)
        latents = {}
        for name, allowed in (("tf32_off", False), ("tf32_on", True)):
            state = backends.tf32_state()
            try:
                backends.allow_tf32_convolutions(allowed)
                torch.backends.cuda.matmul.allow_tf32 = allowed
                latents[name] = encoder(image.to(ctx.device)).float().cpu()
            finally:
                backends.restore_tf32(state)
    figures = {"latent_max_abs": round(float(reference.abs().max()), 3)}
    for name, latent in latents.items():
        figures[f"{name}_max_abs_difference"] = float((latent - reference).abs().max())
        figures[f"{name}_rounded_values_differing"] = int((latent.round() != reference.round()).sum())
    figures["latent_values"] = reference.numel()
    passed = figures["tf32_off_max_abs_difference"] <= figures["tf32_on_max_abs_difference"] + 1e-6
    return {"passed": passed, "figures": figures}


def check_stage1_timing(ctx: Context) -> dict:
    """Full-size stage-1 iterations: fp32 and bf16, cudnn.benchmark off and on, peak memory."""
    import torch

    sys.path.insert(0, str(SCRIPTS))
    from benchmark_pretrain import ours, time_iterations

    from illm.config import load_config
    from illm.experiment import PretrainConfig
    from illm.losses import build_distortion
    from illm.metrics import lpips_network

    config = TINY / "pretrain.toml" if ctx.quick else REPO / "configs" / "0.14bpp.toml"
    steps = 1 if ctx.quick else 3
    figures = {}
    for precision in ("no", "bf16"):
        cfg = load_config(PretrainConfig, config, [f'train.mixed_precision="{precision}"'])
        lpips = lpips_network(cfg.lpips.net, random_backbone=True)
        distortion = build_distortion(cfg.distortion, lpips).to(ctx.device)
        batch = cfg.data.batch_size
        images = torch.rand(batch, 3, cfg.data.crop_size, cfg.data.crop_size, device=ctx.device)
        for benchmark in (False, True):
            torch.backends.cudnn.benchmark = benchmark
            ctx.reset_peak_memory()
            iterate = ours(cfg, distortion, ctx.torch_device, images)
            seconds = time_iterations(iterate, ctx.torch_device, steps)
            name = f"{'fp32' if precision == 'no' else 'bf16'}_benchmark_{'on' if benchmark else 'off'}"
            figures[name] = {
                "seconds_per_iteration": median(seconds),
                "images_per_second": round(batch / median(seconds), 2),
                "peak_memory_gb": ctx.peak_memory_gb(),
                "batch": f"{batch} x {cfg.data.crop_size}^2",
            }
            del iterate
    torch.backends.cudnn.benchmark = False
    return {"passed": True, "figures": figures}


def check_stage2_timing(ctx: Context) -> dict:
    """Full-size stage-2 iterations (random weights) at the released per-process batch."""
    import torch

    sys.path.insert(0, str(SCRIPTS))
    import benchmark_finetune

    from illm.models.hific import HiFiCAutoencoder
    from illm.models.vqvae import VQVAE

    workdir = ctx.work / "stage2_timing"
    workdir.mkdir(parents=True, exist_ok=True)
    batch = 4 if ctx.quick else 16
    crop = (64, 80) if ctx.quick else (256, 256)
    images_folder(ctx, "stage2_timing/images", 2 * batch, crop, seed=3)
    torch.manual_seed(0)
    if ctx.quick:
        from illm.config import load_config
        from illm.experiment import PretrainConfig, VQVAEConfig
        from illm.stages.pretrain import build_autoencoder
        from illm.stages.vqvae import build_vqvae

        benchmark_finetune.CONFIG = TINY / "finetune.toml"
        autoencoder = build_autoencoder(load_config(PretrainConfig, TINY / "pretrain.toml").model)
        labeller = build_vqvae(load_config(VQVAEConfig, TINY / "vqvae.toml").model)
    else:
        autoencoder, labeller = HiFiCAutoencoder(), VQVAE()
    torch.save(autoencoder.state_dict(), workdir / "autoencoder.pt")
    torch.save(labeller.state_dict(), workdir / "vqvae.pt")
    del autoencoder, labeller
    steps = 1 if ctx.quick else 3
    figures = {}
    for name, precision in (("fp32", []), ("bf16", ['train.mixed_precision="bf16"'])):
        benchmark_finetune.VARIANTS[name] = [
            *precision,
            f"data.batch_size={batch}",
            f"data.global_batch_size={batch}",
        ]
        ctx.reset_peak_memory()
        seconds = benchmark_finetune.benchmark(workdir, name, steps)
        figures[name] = {
            "seconds_per_iteration": median(seconds),
            "peak_memory_gb": ctx.peak_memory_gb(),
            "batch": f"{batch} ({batch // 2} compressed + {batch // 2} real) x {crop[0]}x{crop[1]}",
        }
    return {
        "passed": all(math.isfinite(f["seconds_per_iteration"]) for f in figures.values()),
        "figures": figures,
    }


CHECKS = {
    "environment": (check_environment, 120),
    "codec_reference": (check_codec_reference, 180),
    "coder_tables": (check_coder_tables, 240),
    "stage1_validation": (check_stage1_validation, 240),
    "tiny_stages_bf16_resume": (check_tiny_stages_bf16_resume, 420),
    "ddp_world1": (check_ddp_world1, 300),
    "ddp_world2": (check_ddp_world2, 300),
    "fp16": (check_fp16, 240),
    "tf32_latent": (check_tf32_latent, 240),
    "stage1_timing": (check_stage1_timing, 420),
    "stage2_timing": (check_stage2_timing, 420),
}


# --- running them ---------------------------------------------------------------------------------


def run_child(name: str, ctx: Context, result_path: Path) -> None:
    """Run one check in this process and write its result as JSON."""
    if ctx.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("CUDA is not available")
    start = time.perf_counter()
    try:
        result = CHECKS[name][0](ctx)
        result["status"] = "pass" if result.pop("passed") else "fail"
    except Skip as reason:
        result = {"status": "skip", "note": str(reason)}
    except BaseException as error:  # noqa: BLE001 - every failure is a result
        traceback.print_exc()
        message = " ".join(f"{type(error).__name__}: {error}".split())
        result = {"status": "fail", "note": message[:400]}
    result["seconds"] = round(time.perf_counter() - start, 1)
    result_path.write_text(json.dumps(result, default=str))


def run_all(out: Path, ctx: Context, names: list[str], budget: float) -> int:
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "log.txt").open("w")
    results, started = {}, time.monotonic()
    for name in names:
        left = budget - (time.monotonic() - started)
        if left < 20:
            results[name] = {"status": "skip", "note": f"not run: the {budget:.0f} s budget was spent"}
            continue
        result_path = ctx.work / f"{name}.json"
        command = [
            sys.executable,
            __file__,
            str(out),
            "--child",
            name,
            "--device",
            ctx.device,
            "--work",
            str(ctx.work),
        ]
        command += ["--quick"] if ctx.quick else []
        env = dict(os.environ)
        if ctx.device == "cpu":
            env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="1")
        log.write(f"\n===== {name} =====\n")
        log.flush()
        start = time.monotonic()
        try:
            subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=min(CHECKS[name][1], left)
            )
            result = json.loads(result_path.read_text()) if result_path.exists() else None
            if result is None:
                result = {"status": "fail", "note": "the check's process died without a result (see log.txt)"}
        except subprocess.TimeoutExpired:
            result = {"status": "fail", "note": f"timed out after {min(CHECKS[name][1], left):.0f} s"}
        result.setdefault("seconds", round(time.monotonic() - start, 1))
        results[name] = result
        print(f"{name}: {result['status']} ({result['seconds']} s) {result.get('note', '')}", flush=True)
        write_summary(out, ctx, results, time.monotonic() - started)
    log.close()
    write_summary(out, ctx, results, time.monotonic() - started)
    return int(any(result["status"] == "fail" for result in results.values()))


def write_summary(out: Path, ctx: Context, results: dict, seconds: float) -> None:
    environment = results.get("environment", {}).get("figures", {})
    where = ", ".join(environment.get("gpus", [])) or ctx.device
    header = {
        "device": ctx.device,
        "where": where,
        "quick": ctx.quick,
        "torch": environment.get("torch"),
        "seconds": round(seconds, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    (out / "summary.json").write_text(json.dumps({**header, "checks": results}, indent=1, default=str))
    lines = [
        f"# gpu_check on {where}{' (quick)' if ctx.quick else ''}",
        "",
        f"torch {header['torch']}, {header['date']}, {header['seconds']} s in all.",
        "",
        "| check | result | seconds | figures / note |",
        "| --- | --- | --- | --- |",
    ]
    for name, result in results.items():
        figures = json.dumps(result.get("figures", {}), default=str).replace("|", "/")
        note = result.get("note", "")
        lines.append(
            f"| {name} | {result['status'].upper()} | {result.get('seconds', '')} | {note} {figures} |"
        )
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for summary.md, summary.json and log.txt")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny stand-ins for the full-size checks")
    parser.add_argument("--only", default="", help=f"a comma list of: {', '.join(CHECKS)}")
    parser.add_argument("--budget", type=float, default=420, help="seconds for all checks together")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = [name for name in args.only.split(",") if name] or list(CHECKS)
    unknown = [name for name in names if name not in CHECKS]
    if unknown:
        parser.error(f"unknown check {unknown[0]!r}: expected one of {', '.join(CHECKS)}")
    if args.child:
        run_child(args.child, Context(args.device, args.quick, args.work), args.work / f"{args.child}.json")
        return 0
    with tempfile.TemporaryDirectory(prefix="illm-gpu-check-") as work:
        return run_all(args.out, Context(args.device, args.quick, Path(work)), names, args.budget)


if __name__ == "__main__":
    sys.exit(main())
