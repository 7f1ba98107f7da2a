import os
import sys
from pathlib import Path

import pytest
import torch

from illm import download

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "reference" / "golden.pt"
sys.path.insert(0, str(REPO / "tests" / "reference"))
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


TINY_AUTOENCODER = dict(
    latent_channels=8, hyper_channels=8, encoder_channels=(8, 8, 16, 16, 16), num_residual_blocks=1
)


def tiny_autoencoder(seed: int = 0):
    """A tiny HiFiC autoencoder with coder tables, eval mode, weights from `seed`."""
    from illm.models.hific import HiFiCAutoencoder

    torch.manual_seed(seed)
    model = HiFiCAutoencoder(**TINY_AUTOENCODER).eval()
    model.update(force=True)
    return model


@pytest.fixture(autouse=True)
def _threads():
    # Under pytest-xdist every worker is a process of its own: one thread each, or they fight.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))
