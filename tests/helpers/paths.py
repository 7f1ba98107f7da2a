"""Paths into the repository that the tests read."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REFERENCE_DIR = REPO / "tests" / "reference"
GOLDEN = REFERENCE_DIR / "golden.pt"
TINY_CONFIGS = REPO / "illm" / "configs" / "tiny"
