import os
import sys

import pytest
import torch

from helpers.paths import GOLDEN, REFERENCE_DIR, REPO
from illm import download

sys.path.insert(0, str(REFERENCE_DIR))
os.environ.setdefault("TORCH_HOME", str(REPO / ".pytest_cache" / "torch_home"))
os.environ.setdefault(
    "ILLM_CACHE_DIR", str(REPO / ".pytest_cache" / "illm_cache")
)  # weights ids, not ~/.cache


@pytest.fixture(scope="session")
def golden():
    if not GOLDEN.exists():
        pytest.skip(f"golden reference data not found at {GOLDEN}")
    return torch.load(GOLDEN, weights_only=True)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty torch hub cache and a download that always fails: no network access in tests."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_network(url, destination):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(download, "_fetch", no_network)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


@pytest.fixture(autouse=True)
def _threads():
    # Under pytest-xdist every worker is a process of its own: one thread each, or they fight.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))
