"""`make demo`: the whole MS-ILLM method end to end at tiny scale, on a laptop CPU, offline.

Photos bundled with scikit-image (public domain) are the data: most train, two are held
out. Stage 0 trains a tiny VQ-VAE labeller, stage 1 a tiny autoencoder, stage 2 fine-tunes
it against the conditional U-Net discriminator; then both autoencoders are evaluated on the
held-out photos, one photo goes through the `illm` CLI, and a side-by-side PNG shows the
original next to the stage-1 and stage-2 reconstructions.

    python -m illm.demo [--output demo_output] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from illm import cli, codec, evaluate, images, zoo
from illm.config import load_config
from illm.entry import run_main
from illm.errors import IllmError
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


def side_by_side(path: Path, original: torch.Tensor, *reconstructions: torch.Tensor) -> None:
    """original | stage 1 | stage 2, 8 pixels apart."""
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
    args = parser.parse_args(argv)
    return run(args.output, STEPS["quick" if args.quick else "full"])


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
    comparison = output / "side_by_side.png"
    side_by_side(comparison, original, stage1, stage2)

    size = compressed.stat().st_size
    pixels = original.shape[-2] * original.shape[-1]
    minutes = (time.perf_counter() - start) / 60
    print(f"""
== done in {minutes:.1f} min: what the demo made ==
  TensorBoard      {runs}   (open: .venv/bin/tensorboard --logdir {runs})
  results          {results / "results.csv"}  and  {results / "per_image.csv"}
  plots            {results}/*.png
  weights          {weights["stage1"]} (stage 1), {weights["stage2"]} (stage 2)
  compressed file  {compressed}: {size} bytes, {size * 8 / pixels:.4f} bpp
  side by side     {comparison}   (original | stage 1 | stage 2)
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
