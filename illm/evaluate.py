"""Evaluate autoencoders as the MS-ILLM paper does: real bitstreams, then distortion and realism.

    python scripts/evaluate.py --weights W [--weights W2 ...] \\
        --data kodak=DIR clic2020=DIR div2k=DIR -o results/ [--device cuda] [--precision bf16] [--fid-swav]

``W`` is an official name (``msillm_quality_3``), an exported weights file, a training
checkpoint or a training run folder (anything ``illm.zoo.load`` takes). Every image is
compressed to the bytes of a ``.illm`` file and decoded from them; ``bpp`` is the file size
in bits over the pixel count, per image, then averaged. Metrics compare the original with
the decoded 8-bit image (see ``illm.metrics``); FID/KID use the FID/256 patches and are not
computed for Kodak (too few patches), as in the paper.

Writes to the output folder:

- ``results.csv``: one row per model and dataset, with the columns of the official
  ``results.csv`` (empty cells for metrics that are missing or do not apply),
- ``per_image.csv``: sizes, rate, full-reference metrics and coding times of every image,
- ``rd_<dataset>.png``: bpp against PSNR, MS-SSIM, LPIPS and FID, beside the official
  MS-ILLM and No-GAN curves,
- ``evaluation.json``: the settings and why each missing metric is missing,
- with ``--save-bitstreams`` / ``--save-reconstructions``: ``bitstreams/<model>/<dataset>/*.illm``
  and ``reconstructions/<model>/<dataset>/*.png``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from illm import backends, codec, images, zoo
from illm.entry import run_main
from illm.errors import IllmError
from illm.files import atomic_write_bytes
from illm.metrics import ALL_METRICS, DEFAULT_METRICS, DISTRIBUTION_METRICS, ImageMetrics

RESULT_COLUMNS = ("model", "dataset", "bpp", "fid", "fid_swav", "kid", "lpips", "dists", "ms_ssim", "psnr")
PER_IMAGE_COLUMNS = (
    "model",
    "dataset",
    "image",
    "height",
    "width",
    "bytes",
    "bpp",
    "psnr",
    "ms_ssim",
    "lpips",
    "dists",
    "encode_seconds",
    "decode_seconds",
)
OFFICIAL_RESULTS = Path(__file__).parent / "resources" / "official_results.csv"
OFFICIAL_CURVES = {"MS-ILLM": "tab:red", "No-GAN": "tab:blue"}
PLOTTED_METRICS = (
    ("psnr", "PSNR (dB)"),
    ("ms_ssim", "MS-SSIM"),
    ("lpips", "LPIPS (AlexNet)"),
    ("fid", "FID/256"),
)
NO_DISTRIBUTION_METRICS = ("kodak",)  # 24 images: too few 256x256 patches for FID/KID
RANDOM_LABEL = " (random backbones)"


@dataclass
class Settings:
    """What to measure and where to write it."""

    output: Path
    device: torch.device
    metrics: tuple[str, ...]
    precision: str = "fp32"  # of the encoder and generator (see HiFiCAutoencoder.set_precision)
    random_backbones: bool = False
    save_bitstreams: bool = False
    save_reconstructions: bool = False


@dataclass
class Report:
    """Everything measured so far; written to the output folder after each model and dataset."""

    results: list[dict] = field(default_factory=list)
    per_image: list[dict] = field(default_factory=list)
    missing: dict[str, dict[str, dict[str, str]]] = field(
        default_factory=dict
    )  # model -> dataset -> metric -> reason


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Compress every image of each dataset to bytes, decode it, and report rate, distortion and realism.",
    )
    parser.add_argument(
        "--weights",
        action="append",
        required=True,
        metavar="W",
        help="official name, weights file, training checkpoint or run folder (repeatable)",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="NAME=DIR",
        help="datasets as name=folder, e.g. kodak=data/kodak clic2020=data/clic div2k=data/div2k",
    )
    parser.add_argument(
        "-o", "--output", default="results", type=Path, help="output folder (default: results)"
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda when available)",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="precision of the encoder and generator; entropy coding stays float32 (default: fp32)",
    )
    parser.add_argument(
        "--metrics",
        metavar="LIST",
        help=f"comma-separated subset of {','.join(ALL_METRICS)} (default: {','.join(DEFAULT_METRICS)})",
    )
    parser.add_argument(
        "--fid-swav", action="store_true", help="also compute FID with the SwAV ResNet-50 backbone"
    )
    parser.add_argument(
        "--random-backbones",
        action="store_true",
        help="randomly initialised metric networks (for tests and demos; values NOT comparable)",
    )
    parser.add_argument(
        "--save-bitstreams", action="store_true", help="keep the .illm files under OUTPUT/bitstreams"
    )
    parser.add_argument(
        "--save-reconstructions",
        action="store_true",
        help="keep the decoded PNGs under OUTPUT/reconstructions",
    )
    return parser.parse_args(argv)


def parse_datasets(specs: list[str]) -> dict[str, list[Path]]:
    """``["kodak=DIR", ...]`` -> dataset name -> its image files (sorted); bad input raises IllmError."""
    datasets: dict[str, list[Path]] = {}
    for spec in specs:
        name, separator, folder = spec.partition("=")
        name = name.strip()
        if not separator or not name or not folder:
            raise IllmError(f"--data expects NAME=DIR (e.g. kodak=data/kodak), got {spec!r}")
        if not re.fullmatch(r"[\w.-]+", name):
            raise IllmError(f"--data: dataset name {name!r} may only hold letters, digits, '_', '-' and '.'")
        if name in datasets:
            raise IllmError(f"--data names the dataset {name!r} twice")
        datasets[name] = list_images(Path(folder))
    return datasets


def list_images(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name."""
    if not folder.is_dir():
        raise IllmError(f"{folder}: no such folder")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in images.IMAGE_EXTENSIONS)
    if not paths:
        raise IllmError(f"{folder}: no images ({', '.join(images.IMAGE_EXTENSIONS)}) in this folder")
    return paths


def parse_metrics(spec: str | None, fid_swav: bool) -> tuple[str, ...]:
    names = [name.strip() for name in spec.split(",") if name.strip()] if spec else list(DEFAULT_METRICS)
    unknown = [name for name in names if name not in ALL_METRICS]
    if unknown:
        raise IllmError(
            f"--metrics: unknown metric(s) {', '.join(unknown)}; choose from {','.join(ALL_METRICS)}"
        )
    if fid_swav:
        names.append("fid_swav")
    return tuple(name for name in ALL_METRICS if name in names)


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise IllmError(f"--device: unknown device {name!r} (use cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise IllmError("--device cuda: CUDA is not available on this machine")
    return device


def model_name(source: str) -> str:
    """The name used in the CSVs: the official name, or the file or folder name without suffix."""
    if source in zoo.OFFICIAL_WEIGHTS:
        return source
    path = Path(source)
    return path.name if path.is_dir() else path.stem


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status (1 with a one-line error on bad input)."""
    return run_main("evaluate.py", _main, argv)


def _main(argv: list[str]) -> None:
    args = parse_args(argv)
    datasets = parse_datasets(args.data)
    settings = Settings(
        output=args.output,
        device=parse_device(args.device),
        metrics=parse_metrics(args.metrics, args.fid_swav),
        precision=args.precision,
        random_backbones=args.random_backbones,
        save_bitstreams=args.save_bitstreams,
        save_reconstructions=args.save_reconstructions,
    )
    names = [model_name(source) for source in args.weights]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise IllmError(
            f"--weights: several sources are named {', '.join(duplicates)}; rename one of the files"
        )
    if settings.random_backbones:
        print(
            "evaluate.py: warning: --random-backbones: learned metrics use random networks; their values are NOT "
            "comparable",
            file=sys.stderr,
        )
    report = evaluate(dict(zip(names, args.weights)), datasets, settings)
    print(format_table(report.results))
    print(f"wrote {settings.output / 'results.csv'}, {settings.output / 'per_image.csv'} and the plots")


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------


@backends.full_float32()  # the metric networks too: figures that do not depend on TF32
def evaluate(models: dict[str, str], datasets: dict[str, list[Path]], settings: Settings) -> Report:
    """Evaluate every model (name -> source) on every dataset (name -> image files)."""
    try:
        settings.output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise IllmError(f"{settings.output}: cannot create the output folder ({error.strerror})") from None
    report = Report()
    reported_reasons: set[tuple[str, str]] = set()
    for name, source in models.items():
        model, model_id = zoo.load_for_coding(source, settings.device, settings.precision)
        label = name + RANDOM_LABEL if settings.random_backbones else name
        for dataset, paths in datasets.items():
            metrics = ImageMetrics(
                dataset_metrics(dataset, settings.metrics), settings.device, settings.random_backbones
            )
            progress = tqdm(paths, desc=f"{name} on {dataset}", unit="image", file=sys.stderr)
            rows = [
                {
                    "model": label,
                    "dataset": dataset,
                    **evaluate_image(model, model_id, path, metrics, settings, Path(name, dataset)),
                }
                for path in progress
            ]
            report.per_image.extend(rows)
            report.results.append(summarise(label, dataset, rows, metrics.compute()))
            report.missing.setdefault(label, {})[dataset] = dict(metrics.missing)
            for metric, reason in metrics.missing.items():
                if (metric, reason) not in reported_reasons:
                    reported_reasons.add((metric, reason))
                    print(f"warning: {metric} not computed ({name} on {dataset}): {reason}", file=sys.stderr)
            write_report(report, settings)
        del model
    return report


def dataset_metrics(dataset: str, metrics: tuple[str, ...]) -> tuple[str, ...]:
    """The metrics that apply to ``dataset``: no FID/KID on Kodak, as in the paper."""
    if dataset.lower() in NO_DISTRIBUTION_METRICS:
        return tuple(m for m in metrics if m not in DISTRIBUTION_METRICS)
    return metrics


def evaluate_image(
    model, model_id: bytes, path: Path, metrics: ImageMetrics, settings: Settings, subfolder: Path
) -> dict:
    """Compress one image to bytes, decode them, measure; returns its per-image values.

    Saved bitstreams and reconstructions go to ``bitstreams/<subfolder>`` and ``reconstructions/<subfolder>``.
    """
    original = images.to_float(images.read_image(path)).to(settings.device)
    height, width = original.shape[-2:]
    with torch.no_grad():
        start = time.perf_counter()
        data = codec.compress(model, original, model_id=model_id)
        encoded = time.perf_counter()
        decoded = codec.decompress(model, data, model_id=model_id)
        _synchronize(settings.device)
        finished = time.perf_counter()
    reconstruction = images.to_uint8(decoded)
    if settings.save_bitstreams:
        target = settings.output / "bitstreams" / subfolder / f"{path.stem}.illm"
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data)
    if settings.save_reconstructions:
        target = settings.output / "reconstructions" / subfolder / f"{path.stem}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        images.save_image(target, reconstruction)
    values = metrics.update(original, reconstruction.unsqueeze(0))
    row = {
        "image": path.name,
        "height": height,
        "width": width,
        "bytes": len(data),
        "bpp": len(data) * 8 / (height * width),
        "encode_seconds": encoded - start,
        "decode_seconds": finished - encoded,
    }
    row.update({metric: value[0] for metric, value in values.items()})
    return row


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarise(label: str, dataset: str, rows: list[dict], values: dict[str, float | None]) -> dict:
    """The results.csv row of one model on one dataset."""
    return {
        "model": label,
        "dataset": dataset,
        "bpp": math.fsum(r["bpp"] for r in rows) / len(rows),
        **values,
    }


# ----------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------


def write_report(report: Report, settings: Settings) -> None:
    """(Re)write the CSVs, plots and evaluation.json with everything measured so far."""
    write_csv(settings.output / "results.csv", RESULT_COLUMNS, report.results)
    write_csv(settings.output / "per_image.csv", PER_IMAGE_COLUMNS, report.per_image)
    official = read_official_results()
    for dataset in dict.fromkeys(row["dataset"] for row in report.results):
        plot_dataset(
            settings.output / f"rd_{dataset}.png",
            dataset,
            report.results,
            official,
            settings.random_backbones,
        )
    summary = {
        "metrics": list(settings.metrics),
        "random_backbones": settings.random_backbones,
        "comparable_to_official": not settings.random_backbones,
        "device": str(settings.device),
        "precision": settings.precision,
        "missing": report.missing,
    }
    atomic_write_bytes(settings.output / "evaluation.json", json.dumps(summary, indent=2).encode())


def _cell(value) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    """The rows as CSV, quoted where needed (model and image names come from file names)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([_cell(row.get(column)) for column in columns] for row in rows)
    atomic_write_bytes(path, text.getvalue().encode())


def read_official_results(path: Path = OFFICIAL_RESULTS) -> list[dict]:
    """Rows of the official results.csv, numbers as floats (None where empty)."""
    with open(path, newline="") as file:
        return [
            {
                key: (value if key in ("model", "dataset") else float(value) if value else None)
                for key, value in row.items()
            }
            for row in csv.DictReader(file)
        ]


def plot_dataset(
    path: Path, dataset: str, results: list[dict], official: list[dict], random_backbones: bool
) -> None:
    """bpp against PSNR, MS-SSIM, LPIPS and FID for one dataset, ours beside the official curves."""
    figure = Figure(figsize=(11, 8.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2).flatten()
    ours = sorted((row for row in results if row["dataset"] == dataset), key=lambda row: row["bpp"])
    for ax, (metric, axis_label) in zip(axes, PLOTTED_METRICS):
        for model, color in OFFICIAL_CURVES.items():
            curve = sorted(
                (r["bpp"], r[metric])
                for r in official
                if r["model"] == model and r["dataset"] == dataset.lower() and r[metric] is not None
            )
            if curve:
                ax.plot(*zip(*curve), "o-", color=color, markersize=4, label=f"{model} (official)")
        points = [(row["bpp"], row[metric], row["model"]) for row in ours if row.get(metric) is not None]
        if points:
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                "s--",
                color="black",
                markersize=5,
                label="ours",
            )
            for bpp, value, label in points:
                ax.annotate(label, (bpp, value), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if not ax.lines:
            ax.text(
                0.5, 0.5, f"no {axis_label} for {dataset}", ha="center", va="center", transform=ax.transAxes
            )
        ax.set_xlabel("bits per pixel")
        ax.set_ylabel(axis_label + (" (lower is better)" if metric in ("lpips", "fid") else ""))
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    title = f"{dataset}: rate-distortion and rate-realism"
    if random_backbones:
        title += " (RANDOM metric backbones: LPIPS/FID NOT comparable)"
    figure.suptitle(title)
    figure.supxlabel(
        "Official bpp counts about 140 bytes per image of pickle overhead; ours is the .illm file size.",
        fontsize=8,
    )
    figure.savefig(path, dpi=100)


def format_table(results: list[dict]) -> str:
    """The results as an aligned text table for the terminal."""
    header = [column for column in RESULT_COLUMNS]
    rows = [[_format_number(row.get(column)) for column in header] for row in results]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)) for line in [header, *rows]
    )


def _format_number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
