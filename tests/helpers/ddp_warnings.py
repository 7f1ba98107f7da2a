"""Run tests/helpers/ddp_train.py (same arguments) while recording Python warnings, then print
how many of them were DDP's gradient-layout warning, as "grad stride warnings: N"."""

import runpy
import sys
import warnings
from pathlib import Path

DDP_TRAIN = Path(__file__).resolve().parent / "ddp_train.py"
LAYOUT_WARNING = "Grad strides do not match bucket view strides"

if __name__ == "__main__":
    sys.argv[0] = str(DDP_TRAIN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runpy.run_path(str(DDP_TRAIN), run_name="__main__")
    count = sum(LAYOUT_WARNING in str(warning.message) for warning in caught)
    print(f"grad stride warnings: {count}", flush=True)
