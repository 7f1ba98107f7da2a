"""Wall time of `illm compress` and `illm decompress` for one 768x512 photo, full-size model.

    python scripts/benchmark_codec.py [--repeats 3] [--device cpu]

The autoencoder is the official architecture with random weights (`update(force=True)`):
network time depends on the architecture only; the entropy coder's share depends on the
bitrate, which random weights do not make realistic. Each run is a fresh `python -m illm`
process, timed from start to exit (interpreter start, imports, loading the 727 MB of weights
and hashing them included); the CLI's own summary line splits off the model-load time.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from skimage import data
from skimage.transform import resize

from illm import codec, images
from illm.models.hific import HiFiCAutoencoder

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"bpp, (?P<coding>[\d.]+) s \(weights loaded in (?P<load>[\d.]+) s\)")


def make_inputs(folder: Path) -> tuple[Path, Path, float]:
    """A 768x512 (width x height) photo, a full-size autoencoder's state-dict file, and the
    median seconds `codec.weights_id` takes on that autoencoder."""
    photo = resize(data.astronaut(), (768, 768), anti_aliasing=True, preserve_range=True)[128:640]
    image_path = folder / "photo.png"
    images.save_image(image_path, torch.from_numpy(photo.round().astype("uint8")).permute(2, 0, 1))
    torch.manual_seed(0)
    model = HiFiCAutoencoder().eval()
    model.update(force=True)
    weights_path = folder / "weights.pt"
    torch.save(model.state_dict(), weights_path)
    hashing = []
    for _ in range(3):
        start = time.perf_counter()
        codec.weights_id(model)
        hashing.append(time.perf_counter() - start)
    return image_path, weights_path, statistics.median(hashing)


def time_cli(argv: list[str], repeats: int) -> dict[str, float]:
    """Median wall time of `python -m illm argv`, and the medians its summary line reports."""
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    walls, codings, loads = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        command = [sys.executable, "-m", "illm", *argv, "--force"]
        result = subprocess.run(command, capture_output=True, text=True, env=environment)
        walls.append(time.perf_counter() - start)
        if result.returncode != 0:
            sys.exit(f"benchmark: illm {argv[0]} failed: {result.stderr.strip()}")
        summary = SUMMARY.search(result.stdout)
        codings.append(float(summary["coding"]))
        loads.append(float(summary["load"]))
    return {"wall": statistics.median(walls), "coding": statistics.median(codings), "load": statistics.median(loads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        image_path, weights_path, hashing_seconds = make_inputs(folder)
        compressed, decoded = folder / "photo.illm", folder / "decoded.png"
        common = ["--weights", str(weights_path), "--device", args.device]
        compress = time_cli(["compress", *common, str(image_path), "-o", str(compressed)], args.repeats)
        decompress = time_cli(["decompress", *common, str(compressed), "-o", str(decoded)], args.repeats)
        header = codec.read_header(compressed.read_bytes())

    print(f"device {args.device}, {torch.get_num_threads()} threads, median of {args.repeats} runs, 768x512 image")
    print(f"file: {header.file_size:,} bytes ({header.bits_per_pixel:.4f} bpp), framing {header.header_size} bytes")
    print(f"weights_id of the full-size autoencoder (in process): {hashing_seconds:.2f} s")
    for name, timing in (("compress", compress), ("decompress", decompress)):
        print(
            f"illm {name:<10}  wall {timing['wall']:6.2f} s   of which model load + weights id "
            f"{timing['load']:5.2f} s, coding {timing['coding']:6.2f} s"
        )


if __name__ == "__main__":
    main()
