"""`make demo`: the whole MS-ILLM method end to end at tiny scale, on a laptop CPU, offline.

Photos bundled with scikit-image (public domain) are the data: most train, two are held
out. Stage 0 trains a tiny VQ-VAE labeller, stage 1 a tiny autoencoder, stage 2 fine-tunes
it against the conditional U-Net discriminator; then both autoencoders are evaluated on the
held-out photos, one photo goes through the `illm` CLI, and a side-by-side PNG shows the
original, JPEG at the same bitrate, and the stage-1 and stage-2 reconstructions. The tiny
models prove the method runs end to end; they are far too small to beat JPEG.

Where the official MS-ILLM and No-GAN weights are in the torch hub cache, the demo also codes
the held-out photos with them beside JPEG at the same bitrate: the comparison the paper is
about. ``--official`` does only that, downloading the weights if needed (``make demo-official``).

    python -m illm.demo [--output demo_output] [--quick | --official]
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from illm import cli, codec, evaluate, images, metrics, zoo
from illm.config import load_config
from illm.entry import run_main
from illm.errors import IllmError, MissingWeightsError
from illm.experiment import FinetuneConfig, PretrainConfig, VQVAEConfig
from illm.export import export
from illm.stages import finetune, pretrain, vqvae

PROGRAM = "illm.demo"

CONFIGS = Path(__file__).resolve().parent / "configs" / "tiny"  # package data: works installed too
MARKER = ".illm-demo"
# Mostly colour photos: with too many grayscale ones the tiny model learns to drop colour.
TRAIN_PHOTOS = [
    "astronaut",
    "coffee",
    "hubble_deep_field",
    "immunohistochemistry",
    "rocket",
    "colorwheel",
    "grass",
    "gravel",
]
HELD_OUT_PHOTOS = ["chelsea", "camera"]
TILE = 128
# The official models shown beside JPEG: a low rate that JPEG can still reach on the held-out photos.
OFFICIAL_MODELS = {"msillm_quality_3": "MS-ILLM", "noganms_quality_3": "No-GAN"}

# Steps per stage: the full demo, and --quick (for the test suite: proves the wiring only).
STEPS = {
    "full": {"vqvae": 300, "pretrain": 2000, "finetune": 300},
    "quick": {"vqvae": 2, "pretrain": 2, "finetune": 2},
}


def photo(name: str) -> np.ndarray:
    """A scikit-image sample photo as RGB uint8 (grayscale replicated)."""
    import skimage.data

    array = getattr(skimage.data, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return np.ascontiguousarray(array[..., :3]).astype(np.uint8)


def write_photos(root: Path) -> tuple[Path, Path]:
    """Training tiles (cut once, so loading is cheap) and the held-out photos, as PNG."""
    train, held_out = root / "train", root / "held_out"
    train.mkdir(parents=True)
    held_out.mkdir(parents=True)
    for name in TRAIN_PHOTOS:
        array = photo(name)
        for top in range(0, array.shape[0] - TILE + 1, TILE):
            for left in range(0, array.shape[1] - TILE + 1, TILE):
                Image.fromarray(array[top : top + TILE, left : left + TILE]).save(
                    train / f"{name}_{top}_{left}.png"
                )
    for name in HELD_OUT_PHOTOS:
        Image.fromarray(photo(name)).save(held_out / f"{name}.png")
    return train, held_out


def prepare_output(output: Path) -> None:
    """Start from an empty folder; only a folder an earlier demo made is ever cleared."""
    if output.exists():
        if not (output / MARKER).exists():
            raise IllmError(f"{output} exists and was not made by the demo: choose another --output")
        shutil.rmtree(output)
    output.mkdir(parents=True)
    (output / MARKER).write_text("made by python -m illm.demo; cleared by the next demo run\n")


def jpeg_at_most(image: torch.Tensor, max_bytes: int) -> tuple[int, bytes]:
    """The highest JPEG quality (PIL, its default 4:2:0 subsampling) whose file of ``image``
    (float 1x3xHxW) is no larger than ``max_bytes``, with that file; quality 1's when none is."""
    picture = Image.fromarray(images.to_uint8(image).reshape(3, *image.shape[-2:]).permute(1, 2, 0).numpy())

    def encoded(quality: int) -> bytes:
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue()

    low, high = 1, 95  # sizes grow with quality: find the last one that fits
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if len(encoded(middle)) <= max_bytes else (low, middle - 1)
    return low, encoded(low)


def decode_jpeg(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as picture:
        array = np.asarray(picture.convert("RGB"))
    return images.to_float(torch.from_numpy(array.copy()).permute(2, 0, 1))


def psnr(reconstruction: torch.Tensor, original: torch.Tensor) -> float:
    return float(metrics.psnr(reconstruction.reshape(original.shape), original)[0])


def side_by_side(path: Path, original: torch.Tensor, *reconstructions: torch.Tensor) -> None:
    """The images in a row, 8 pixels apart."""
    panels = [images.to_uint8(original)] + [images.to_uint8(r) for r in reconstructions]
    gap = torch.full((3, panels[0].shape[1], 8), 255, dtype=torch.uint8)
    row = torch.cat([p if i == 0 else torch.cat([gap, p], dim=2) for i, p in enumerate(panels)], dim=2)
    images.save_image(path, row)


def main(argv=None) -> int:
    """Command line entry point; returns the exit status."""
    return run_main(PROGRAM, _main, argv)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("demo_output"),
        help="folder for everything the demo makes (default: demo_output)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few steps per stage: checks the wiring, learns nothing"
    )
    parser.add_argument(
        "--official",
        action="store_true",
        help="only code the held-out photos with the official MS-ILLM and No-GAN weights beside JPEG "
        "(downloads them into the torch hub cache if needed)",
    )
    args = parser.parse_args(argv)
    if args.official:
        prepare_output(args.output)
        _, held_out = write_photos(args.output / "photos")
        print(official_comparison(args.output, held_out, download=True))
        return 0
    return run(args.output, STEPS["quick" if args.quick else "full"])


def official_comparison(output: Path, held_out: Path, download: bool) -> str:
    """Code each held-out photo with the official models, beside JPEG at the MS-ILLM file's size;
    write ``official_<photo>.png`` (original | JPEG | MS-ILLM | No-GAN) and return a summary.

    Without ``download``, only weights already in the torch hub cache are used; when they are not
    all there, the summary is one line saying how to get them.
    """
    missing = [name for name in OFFICIAL_MODELS if not zoo.official_path(name).is_file()]
    if missing and not download:
        return (
            f"official models: not in the torch hub cache ({zoo.official_path(missing[0]).parent}); "
            "run `make demo-official` (or python -m illm.demo --official) once online to compare them with JPEG"
        )
    try:
        models = {label: zoo.load_for_coding(name) for name, label in OFFICIAL_MODELS.items()}
    except MissingWeightsError as error:
        raise IllmError(f"official models: {error}") from None
    lines = ["official models on the held-out photos, beside JPEG at no more bytes than MS-ILLM's file:"]
    lines.append(f"  {'photo':10s} {'coder':10s} {'bpp':>7s} {'PSNR dB':>8s}")
    for path in sorted(held_out.glob("*.png")):
        original = images.to_float(images.read_image(path))
        pixels = original.shape[-2] * original.shape[-1]
        decoded, sizes = {}, {}
        for label, (model, model_id) in models.items():
            data = codec.compress(model, original, model_id=model_id)
            decoded[label], sizes[label] = codec.decompress(model, data, model_id=model_id), len(data)
        quality, jpeg = jpeg_at_most(original, sizes["MS-ILLM"])
        decoded[f"JPEG q{quality}"], sizes[f"JPEG q{quality}"] = decode_jpeg(jpeg), len(jpeg)
        if sizes[f"JPEG q{quality}"] > sizes["MS-ILLM"]:
            lines.append(
                f"  {path.stem:10s} JPEG cannot be this small: quality 1 is larger than MS-ILLM's file"
            )
        for label in (f"JPEG q{quality}", *models):
            bpp = 8 * sizes[label] / pixels
            lines.append(f"  {path.stem:10s} {label:10s} {bpp:7.4f} {psnr(decoded[label], original):8.2f}")
        side_by_side(
            output / f"official_{path.stem}.png",
            original,
            decoded[f"JPEG q{quality}"],
            *(decoded[label] for label in models),
        )
    lines.append(f"  pictures: {output}/official_<photo>.png (original | JPEG | MS-ILLM | No-GAN)")
    return "\n".join(lines)


def run(output: Path, steps: dict[str, int]) -> int:
    start = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    prepare_output(output)
    train_dir, held_out = write_photos(output / "photos")
    runs = output / "runs"
    data = [f"data.train={train_dir}", f"data.val={held_out}", "data.val_max_images=2"]

    print(f"\n== stage 0: VQ-VAE labeller ({steps['vqvae']} steps) ==")
    vqvae.train(
        load_config(
            VQVAEConfig,
            CONFIGS / "vqvae.toml",
            [
                f"run.dir={runs / 'vqvae'}",
                *data,
                f"train.max_steps={steps['vqvae']}",
                f"checkpoint.every={steps['vqvae']}",
                f"logging.val_every={steps['vqvae']}",
            ],
        )
    )

    print(f"\n== stage 1: autoencoder, rate + distortion ({steps['pretrain']} steps) ==")
    pretrain.train(
        load_config(
            PretrainConfig,
            CONFIGS / "pretrain.toml",
            [
                f"run.dir={runs / 'pretrain'}",
                *data,
                f"train.max_steps={steps['pretrain']}",
                f"checkpoint.every={steps['pretrain']}",
                f"logging.val_every={max(1, steps['pretrain'] // 3)}",
                f"optim.warmup_steps={min(20, steps['pretrain'] // 2)}",
                f"optim.decay_steps={steps['pretrain'] + 1}",
                "data.batch_size=8",
            ],
        )
    )

    print(
        f"\n== stage 2: MS-ILLM fine-tuning against the VQ-label discriminator ({steps['finetune']} steps) =="
    )
    finetune.train(
        load_config(
            FinetuneConfig,
            CONFIGS / "finetune.toml",
            [
                f"run.dir={runs / 'finetune'}",
                f"init.autoencoder={runs / 'pretrain'}",
                f"init.labeller={runs / 'vqvae'}",
                *data,
                f"train.max_steps={steps['finetune']}",
                f"checkpoint.every={steps['finetune']}",
                f"logging.val_every={steps['finetune']}",
                "data.batch_size=8",
            ],
        )
    )

    print("\n== export ==")
    weights = {stage: output / f"{stage}.pt" for stage in ("stage1", "stage2")}
    export(runs / "pretrain", weights["stage1"])
    export(runs / "finetune", weights["stage2"])
    print(f"exported {weights['stage1']} and {weights['stage2']}")

    print("\n== evaluation on the held-out photos ==")
    results = output / "results"
    evaluate.main(
        [
            "--weights",
            str(weights["stage1"]),
            "--weights",
            str(weights["stage2"]),
            "--data",
            f"held_out={held_out}",
            "-o",
            str(results),
            "--save-reconstructions",
        ]
    )

    print("\n== the illm CLI: compress and decompress one photo ==")
    example = held_out / f"{HELD_OUT_PHOTOS[0]}.png"
    compressed = output / f"{HELD_OUT_PHOTOS[0]}.illm"
    decoded = output / f"{HELD_OUT_PHOTOS[0]}_decoded.png"
    cli.main(["compress", "--weights", str(weights["stage2"]), str(example), "-o", str(compressed)])
    cli.main(["decompress", "--weights", str(weights["stage2"]), str(compressed), "-o", str(decoded)])

    original = images.to_float(images.read_image(example))
    stage1 = codec.decompress(
        zoo.load(str(weights["stage1"])), codec.compress(zoo.load(str(weights["stage1"])), original)
    )
    stage2 = images.to_float(images.read_image(decoded))
    size = compressed.stat().st_size
    pixels = original.shape[-2] * original.shape[-1]
    quality, jpeg = jpeg_at_most(original, size)
    jpeg_image = decode_jpeg(jpeg)
    comparison = output / "side_by_side.png"
    side_by_side(comparison, original, jpeg_image, stage1, stage2)
    official = official_comparison(output, held_out, download=False)
    ours_psnr, jpeg_psnr = psnr(stage2, original), psnr(jpeg_image, original)
    jpeg_note = "" if len(jpeg) <= size else " (JPEG cannot be this small: quality 1 is larger)"
    minutes = (time.perf_counter() - start) / 60
    print(f"""
== done in {minutes:.1f} min: what the demo made ==
  TensorBoard      {runs}   (open: .venv/bin/tensorboard --logdir {runs})
  results          {results / "results.csv"}  and  {results / "per_image.csv"}
  plots            {results}/*.png
  weights          {weights["stage1"]} (stage 1), {weights["stage2"]} (stage 2)
  compressed file  {compressed}: {size} bytes, {size * 8 / pixels:.4f} bpp, PSNR {ours_psnr:.2f} dB
  JPEG, same size  quality {quality}: {len(jpeg)} bytes, {len(jpeg) * 8 / pixels:.4f} bpp, PSNR {jpeg_psnr:.2f} dB{jpeg_note}
  side by side     {comparison}   (original | JPEG | stage 1 | stage 2)

The tiny models show that every stage runs and learns, end to end, on a CPU in minutes; they are
far too small to beat JPEG, and say nothing about what MS-ILLM reaches at full scale.
{official}
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
