"""Peak memory and wall time of compressing and decompressing large photos, tiled and untiled.

    python scripts/benchmark_tiling.py [--megapixels 2 8 33] [--modes tiled untiled]
                                       [--threads 2] [--limit-gb 20]

The autoencoder is the official architecture with random weights (memory and time depend on the
architecture, not on the weights). The photo is scikit-image's astronaut, upscaled (bilinear) to
16:9 frames of about 2, 8 and 33 megapixels. Each (size, mode, direction) runs in a fresh child
process; its peak resident memory is the child's `ru_maxrss` (model, image and coder included).
A watchdog stops a child whose resident memory passes ``--limit-gb``: an untiled run that does
not fit this machine is reported as stopped at that size rather than taking it down. The
decompress runs read the file that the tiled compress run wrote.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FRAMES = {0: (270, 480), 2: (1080, 1920), 8: (2160, 3840), 33: (4320, 7680)}  # 0: a quick smoke run


def child(megapixels: int, mode: str, direction: str, folder: Path, threads: int) -> dict:
    import torch
    import torch.nn.functional as F
    from skimage import data

    from illm import codec, images, tiling
    from illm.models.hific import HiFiCAutoencoder

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = HiFiCAutoencoder().eval()
    model.update(force=True)
    model_id = codec.weights_id(model)
    tile = 0 if mode == "untiled" else tiling.DEFAULT_TILE
    height, width = FRAMES[megapixels]
    path = folder / f"{megapixels}mp.illm"
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    if direction == "compress":
        photo = images.to_float(torch.from_numpy(data.astronaut()).permute(2, 0, 1))
        photo = F.interpolate(photo, size=(height, width), mode="bilinear", align_corners=False).clamp(0, 1)
        start = time.perf_counter()
        encoded = codec.compress(model, photo, model_id=model_id, tile=tile)
        if mode == "tiled":
            path.write_bytes(encoded)
    else:
        decoded = codec.decompress(model, path.read_bytes(), model_id=model_id, tile=tile)
        assert decoded.shape[-2:] == (height, width)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"seconds": round(seconds, 1), "peak_gb": round(peak, 2), "model_gb": round(baseline, 2)}


def run_child(
    megapixels: int, mode: str, direction: str, folder: Path, threads: int, limit_gb: float
) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        str(megapixels),
        mode,
        direction,
        str(folder),
        str(threads),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            rss_kb = next(
                int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS")
            )
        except (OSError, StopIteration):
            rss_kb = 0
        if rss_kb > limit_gb * 2**20:
            process.kill()
            process.wait()
            return {"stopped_at_gb": limit_gb}
        time.sleep(0.2)
    output = process.stdout.read().strip().splitlines()
    if process.returncode != 0 or not output:
        return {"failed": process.returncode}
    return json.loads(output[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        megapixels, mode, direction, folder, threads = sys.argv[2:]
        print(json.dumps(child(int(megapixels), mode, direction, Path(folder), int(threads))))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--megapixels", type=int, nargs="+", default=[2, 8, 33], choices=sorted(FRAMES))
    parser.add_argument("--modes", nargs="+", default=["tiled", "untiled"], choices=["tiled", "untiled"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit-gb", type=float, default=20.0, help="stop a child whose RSS passes this")
    args = parser.parse_args()
    modes = sorted(args.modes, key=["tiled", "untiled"].index)  # the tiled compress writes the file
    print("| image | mode | compress s | compress peak GB | decompress s | decompress peak GB |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for megapixels in args.megapixels:
            height, width = FRAMES[megapixels]
            for mode in modes:
                cells = []
                for direction in ("compress", "decompress"):
                    result = run_child(megapixels, mode, direction, Path(folder), args.threads, args.limit_gb)
                    print(f"  {megapixels} MP {mode} {direction}: {result}", file=sys.stderr, flush=True)
                    if "stopped_at_gb" in result:
                        cells += ["-", f"> {result['stopped_at_gb']:g} (stopped)"]
                    elif "failed" in result:
                        cells += ["-", f"failed (exit {result['failed']})"]
                    else:
                        cells += [f"{result['seconds']:.0f}", f"{result['peak_gb']:.1f}"]
                print(
                    f"| {width}x{height} ({height * width / 1e6:.1f} MP) | {mode} | "
                    + " | ".join(cells)
                    + " |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
