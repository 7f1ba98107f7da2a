import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "reference" / "golden.pt"
sys.path.insert(0, str(REPO / "tests" / "reference"))
os.environ.setdefault("TORCH_HOME", str(REPO / ".pytest_cache" / "torch_home"))


@pytest.fixture(scope="session")
def golden():
    if not GOLDEN.exists():
        pytest.skip(f"golden reference data not found at {GOLDEN}")
    return torch.load(GOLDEN, weights_only=True)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
