"""Codec speed, full-size model, one 768x512 photo: fp32 against bf16, and against the official code.

    python scripts/benchmark_codec.py [--repeats 3] [--official-path DIR] [--before REV]

Everything is measured in one run, alternating between the variants, so that the ratios hold
even on a loaded machine (the seconds do not):

1. In process (`illm.codec`): compress and decompress in fp32 and with ``--precision bf16``,
   and with the official `neuralcompression` package if ``--official-path`` points at it
   (``pip install --no-deps --target DIR neuralcompression==0.3.1``: a separate folder, never
   this project's dependencies). Before timing it, the official model is checked against
   tests/reference/golden.pt, and its bytes against ours.
2. bf16's effect on the image: PSNR between the fp32 and bf16 generator outputs of one file,
   and the share of latent values that the bf16 encoder rounds differently.
3. Imports: compressai imported as a package against `illm.models._compressai`.
4. The command line: wall time of fresh ``python -m illm`` processes; the overhead is the wall
   time minus the coding time that the CLI reports. The first call of a weights file hashes it
   for the weights id (empty cache); later calls read the id back. ``--before REV`` times the
   CLI of an older commit too (from ``git archive REV``).

The autoencoder is the official architecture with random weights (the network time depends
on the architecture only; the entropy coder's share depends on the bitrate, which random weights
do not make realistic).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from io import BytesIO
from pathlib import Path

import torch
from skimage import data
from skimage.transform import resize

from illm import codec, images, tiling, zoo
from illm.models.hific import HiFiCAutoencoder

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"bpp, (?P<coding>[\d.]+) s \(weights loaded in (?P<load>[\d.]+) s\)")


def make_inputs(folder: Path) -> tuple[Path, Path, torch.Tensor]:
    """A 768x512 (width x height) photo as a file and as a 1 x 3 x H x W tensor, and a full-size
    autoencoder's state-dict file."""
    photo = resize(data.astronaut(), (768, 768), anti_aliasing=True, preserve_range=True)[128:640]
    pixels = torch.from_numpy(photo.round().astype("uint8")).permute(2, 0, 1)
    image_path = folder / "photo.png"
    images.save_image(image_path, pixels)
    torch.manual_seed(0)
    model = HiFiCAutoencoder().eval()
    model.update(force=True)
    weights_path = folder / "weights.pt"
    torch.save(model.state_dict(), weights_path)
    return image_path, weights_path, images.to_float(pixels).reshape(1, 3, 512, 768)


# ----------------------------------------------------------------------------------------
# The official package, imported from its own folder
# ----------------------------------------------------------------------------------------


class _Stub(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(
            name, (), {"__init__": lambda self, *a, **k: None, "__call__": lambda self, *a, **k: None}
        )


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty stand-ins for fvcore, which neuralcompression imports only for its FLOP counter."""

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "fvcore":
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Stub(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def official_autoencoder(path: Path, state_dict: dict | None):
    """neuralcompression's HiFiCAutoencoder from ``path``, with ``state_dict``'s weights (or
    as it initialises itself) and coder tables built from them."""
    from compressai.models.base import get_scale_table

    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
        sys.meta_path.insert(0, _StubFinder())
    from neuralcompression.models import HiFiCAutoencoder as Official

    model = Official().eval()
    if state_dict is not None:
        model.load_state_dict(state_dict)  # compressai's CompressionModel sizes the coder tables
    model.hyper_bottleneck.update(force=True)
    model.latent_bottleneck.update_scale_table(get_scale_table(), force=True)
    return model


def check_official_against_golden(path: Path) -> str:
    """Whether the official package reproduces tests/reference/golden.pt (bytes and image)."""
    sys.path.insert(0, str(REPO / "tests" / "reference"))
    from fill_weights import fill_

    golden = torch.load(REPO / "tests" / "reference" / "golden.pt", weights_only=True)
    model = official_autoencoder(path, None)
    fill_(model, salt=golden["salt"])
    model.hyper_bottleneck.update(force=True)
    from compressai.models.base import get_scale_table

    model.latent_bottleneck.update_scale_table(get_scale_table(), force=True)
    expected = golden["hific"]
    height, width = expected["odd_size"]
    image = golden["image_u8"].float()[None, :, :height, :width] / 255
    with torch.no_grad():
        compressed = model.compress(image)
        decoded = model.decompress(compressed)
    same_bytes = (compressed.latent_strings[0], compressed.hyper_latent_strings[0]) == (
        expected["latent_string"],
        expected["hyper_string"],
    )
    pixels = ((decoded * 255).round() != (expected["decompressed"] * 255).round()).float().mean().item()
    return f"golden strings {'match' if same_bytes else 'DIFFER'}, decoded pixels differing: {pixels:.2%}"


# ----------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def in_process(weights: Path, image: torch.Tensor, repeats: int, official_path: Path | None) -> dict:
    """Median seconds of compress and decompress per variant, alternating between variants."""
    models = {precision: zoo.load_for_coding(weights, precision=precision) for precision in ("fp32", "bf16")}
    model_id = models["fp32"][1]
    files = {name: codec.compress(model, image, model_id=model_id) for name, (model, _) in models.items()}
    jobs = {}
    for name, (model, _) in models.items():
        jobs[f"compress {name}"] = lambda model=model: codec.compress(model, image, model_id=model_id)
        jobs[f"decompress {name}"] = lambda model=model, name=name: codec.decompress(
            model, files[name], model_id=model_id
        )
    notes = {}
    if official_path is not None:
        notes["official check"] = check_official_against_golden(official_path)
        official = official_autoencoder(official_path, torch.load(weights, weights_only=True))
        with torch.no_grad():
            official_file = official.compress(image)
        ours = models["fp32"][0].compress(image)[0]
        same = ours == (official_file.latent_strings[0], official_file.hyper_latent_strings[0])
        notes["ours fp32 == official bytes"] = str(same)
        jobs["compress official"] = lambda: official.compress(image)
        jobs["decompress official"] = lambda: official.decompress(official_file)
    seconds = {name: [] for name in jobs}
    with torch.no_grad():
        for job in jobs.values():  # warm-up: first-call allocations and page-ins
            job()
        for _ in range(repeats):
            for name, job in jobs.items():
                seconds[name].append(timed(job))
    return {
        "median": {name: statistics.median(values) for name, values in seconds.items()},
        "notes": notes,
        "files": files,
        "models": models,
    }


def bf16_effect(measured: dict, image: torch.Tensor) -> dict:
    """PSNR between fp32 and bf16 generator outputs of one file; latent values rounded differently."""
    (fp32, model_id), (bf16, _) = measured["models"]["fp32"], measured["models"]["bf16"]
    fp32_file = measured["files"]["fp32"]
    decoded = {
        name: codec.decompress(model, fp32_file, model_id=model_id)
        for name, model in (("fp32", fp32), ("bf16", bf16))
    }
    latents = []
    generate = tiling.generate
    tiling.generate = lambda generator, latent, tile: (
        latents.append(latent) or generate(generator, latent, tile)
    )
    try:
        for name in ("fp32", "bf16"):
            codec.decompress(fp32, measured["files"][name], model_id=model_id)
    finally:
        tiling.generate = generate
    return {
        "generator PSNR fp32 vs bf16 (dB)": psnr(decoded["fp32"], decoded["bf16"]),
        "reconstruction PSNR fp32 / bf16 against the photo (dB, random weights)": (
            psnr(decoded["fp32"], image),
            psnr(decoded["bf16"], image),
        ),
        "latent values the bf16 encoder rounds differently": (latents[0] != latents[1]).float().mean().item(),
    }


def psnr(first: torch.Tensor, second: torch.Tensor) -> float:
    first, second = ((image * 255).round() for image in (first, second))
    return (10 * torch.log10(255**2 / (first - second).pow(2).mean())).item()


def fresh_python(
    arguments: list[str], environment: dict | None = None, code_path: Path = REPO
) -> tuple[float, subprocess.CompletedProcess]:
    """Run python in ``code_path`` (``-m`` and ``-c`` put the working folder first on sys.path)."""
    start = time.perf_counter()
    command = [sys.executable, *arguments]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=code_path)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"benchmark: python {' '.join(arguments)} failed: {result.stderr.strip()[-2000:]}")
    return seconds, result


def imports(repeats: int) -> dict:
    """Median wall time of fresh interpreters importing torch, then compressai either way."""
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    variants = {
        "import torch": "import torch",
        "import compressai (the package)": "import compressai.entropy_models",
        "import illm.models._compressai": "import illm.models._compressai",
    }
    seconds = {name: [] for name in variants}
    for _ in range(repeats):
        for name, code in variants.items():
            seconds[name].append(fresh_python(["-W", "ignore", "-c", code], environment)[0])
    return {name: statistics.median(values) for name, values in seconds.items()}


def cli(argv_by_name: dict[str, list[str]], repeats: int, code_path: Path, cache: Path) -> dict:
    """Per variant: median wall, coding and load seconds of fresh ``python -m illm`` processes;
    the first run of each variant starts with an empty weights-id cache."""
    results = {name: {"wall": [], "coding": [], "load": []} for name in argv_by_name}
    first = {}
    for repeat in range(repeats + 1):
        for name, argv in argv_by_name.items():
            variant_cache = cache / name.replace(" ", "_")
            environment = {**os.environ, "PYTHONPATH": str(code_path), "ILLM_CACHE_DIR": str(variant_cache)}
            wall, result = fresh_python(["-m", "illm", *argv, "--force"], environment, code_path)
            summary = SUMMARY.search(result.stdout)
            timing = {"wall": wall, "coding": float(summary["coding"]), "load": float(summary["load"])}
            if repeat == 0:
                first[name] = timing
                continue
            for key, value in timing.items():
                results[name][key].append(value)
    return {
        name: {"first": first[name], **{key: statistics.median(values) for key, values in timing.items()}}
        for name, timing in results.items()
    }


def old_checkout(revision: str, folder: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision], capture_output=True, check=True
    ).stdout
    target = folder / f"illm-{revision}"
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--official-path", type=Path, help="folder with the neuralcompression 0.3.1 package")
    parser.add_argument("--before", metavar="REV", help="also time the CLI of this older commit")
    parser.add_argument("--skip", nargs="*", default=(), choices=("in-process", "imports", "cli"))
    args = parser.parse_args()
    print(
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"medians of {args.repeats} alternating runs;"
    )
    print("the CPU may be shared: compare the ratios, not the seconds.\n")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        os.environ["ILLM_CACHE_DIR"] = str(folder / "cache")  # weights ids of temporary files: not ~/.cache
        image_path, weights_path, image = make_inputs(folder)
        if "in-process" not in args.skip:
            report_in_process(in_process(weights_path, image, args.repeats, args.official_path), image)
        if "imports" not in args.skip:
            report_imports(imports(args.repeats))
        if "cli" not in args.skip:
            report_cli(folder, image_path, weights_path, args.repeats, args.before)


def report_in_process(measured: dict, image: torch.Tensor) -> None:
    median = measured["median"]
    header = codec.read_header(measured["files"]["fp32"])
    print(f"In process, 768x512, {header.file_size:,} bytes ({header.bits_per_pixel:.4f} bpp)")
    for note, value in measured["notes"].items():
        print(f"  {note}: {value}")
    for operation in ("compress", "decompress"):
        fp32, bf16 = median[f"{operation} fp32"], median[f"{operation} bf16"]
        line = f"  {operation:<10}  fp32 {fp32:6.2f} s   bf16 {bf16:6.2f} s   bf16/fp32 {bf16 / fp32:5.2f}x"
        official = median.get(f"{operation} official")
        if official:
            line += (
                f"   official {official:6.2f} s   fp32/official {fp32 / official:5.2f}x"
                f"   bf16/official {bf16 / official:5.2f}x"
            )
        print(line)
    for name, value in bf16_effect(measured, image).items():
        shown = " / ".join(f"{v:.2f}" for v in value) if isinstance(value, tuple) else f"{value:.4g}"
        print(f"  {name}: {shown}")
    print()


def report_imports(seconds: dict) -> None:
    torch_seconds = seconds["import torch"]
    print("Imports (fresh interpreters, wall)")
    for name, value in seconds.items():
        extra = "" if name == "import torch" else f"   (+{value - torch_seconds:.2f} s over torch)"
        print(f"  {name:<34} {value:5.2f} s{extra}")
    print()


def report_cli(folder: Path, image_path: Path, weights_path: Path, repeats: int, before: str | None) -> None:
    compressed, decoded = folder / "photo.illm", folder / "decoded.png"
    common = ["--weights", str(weights_path), "--device", "cpu"]
    compress = ["compress", *common, str(image_path), "-o", str(compressed)]
    decompress = ["decompress", *common, str(compressed), "-o", str(decoded)]
    variants = {
        "compress fp32": compress,
        "compress bf16": [*compress, "--precision", "bf16"],
        "decompress fp32": decompress,
        "decompress bf16": [*decompress, "--precision", "bf16"],
    }
    timings = cli(variants, repeats, REPO, folder / "cache")
    if before:
        old = old_checkout(before, folder)
        old_timings = cli(
            {f"{name} @{before}": variants[name] for name in ("compress fp32", "decompress fp32")},
            repeats,
            old,
            folder / "old_cache",
        )
        timings.update(old_timings)
    print("Command line (fresh python -m illm processes; overhead = wall - coding)")
    for name, timing in timings.items():
        first = timing["first"]
        print(
            f"  {name:<26} wall {timing['wall']:5.2f} s  coding {timing['coding']:5.2f} s  "
            f"overhead {timing['wall'] - timing['coding']:5.2f} s (load + id {timing['load']:4.2f} s)   "
            f"first call: wall {first['wall']:5.2f} s, overhead {first['wall'] - first['coding']:5.2f} s"
        )
    if before:
        for operation in ("compress", "decompress"):
            new, old = timings[f"{operation} fp32"], timings[f"{operation} fp32 @{before}"]
            print(
                f"  {operation} fp32 overhead now / @{before}: "
                f"{(new['wall'] - new['coding']) / (old['wall'] - old['coding']):.2f}x"
            )


if __name__ == "__main__":
    main()
