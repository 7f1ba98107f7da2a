"""Start-up time of the torch-free commands: ``illm --help``, ``--version``, ``list`` and ``info``.

    python scripts/benchmark_cli.py [--repeats 10] [--budget 0.5]

Each command runs in a fresh ``python -m illm`` process; the wall time of the whole process
(interpreter start included) is reported as the median and the worst of ``--repeats`` runs, with
whether the process imported torch. Exits with status 1 when a median is over ``--budget``
seconds or a command imported torch. Time it on an idle machine: a loaded one says little.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from illm import fileformat  # noqa: E402  (torch-free)

# Runs the CLI, then says on stderr whether torch was imported (argparse's --help exits inside main).
_PROBE = (
    "import atexit, sys; "
    "atexit.register(lambda: print('torch imported:', 'torch' in sys.modules, file=sys.stderr)); "
    "from illm.cli import main; sys.exit(main(sys.argv[1:]))"
)


def write_illm_file(path: Path) -> Path:
    """A well-framed 64 x 64 .illm file (`info` reads only the framing)."""
    body = fileformat.HEADER.pack(fileformat.MAGIC, fileformat.VERSION, bytes(4), 64, 64) + bytes(16)
    path.write_bytes(body + fileformat.CRC.pack(zlib.crc32(body)))
    return path


def time_command(argv: list[str], repeats: int) -> tuple[list[float], bool]:
    """Wall seconds of each fresh process, and whether any imported torch."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    seconds, imported = [], False
    for _ in range(repeats):
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, env=environment
        )
        seconds.append(time.perf_counter() - start)
        if result.returncode != 0:
            raise SystemExit(
                f"benchmark_cli.py: error: illm {' '.join(argv)} failed: {result.stderr.strip()}"
            )
        imported |= "torch imported: True" in result.stderr
    return seconds, imported


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="fresh processes per command (default: 10)")
    parser.add_argument("--budget", type=float, default=0.5, help="seconds a median may take (default: 0.5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        file = write_illm_file(Path(folder) / "photo.illm")
        commands = [["--help"], ["--version"], ["list"], ["info", str(file)]]
        print(f"{'command':24s} {'median s':>9s} {'worst s':>8s}  torch imported")
        failed = False
        for argv in commands:
            seconds, imported = time_command(argv, args.repeats)
            median = statistics.median(seconds)
            failed |= imported or median > args.budget
            label = "illm " + " ".join(a if a != str(file) else "FILE" for a in argv)
            print(f"{label:24s} {median:9.3f} {max(seconds):8.3f}  {'yes' if imported else 'no'}")
    print(f"budget: median under {args.budget} s, no torch: {'FAILED' if failed else 'met'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
