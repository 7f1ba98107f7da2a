"""What a fresh process imports: `illm compress` and `illm decompress` load neither
torch_geometric (which compressai's package imports) nor timm (the VQ-VAE's) nor scipy.stats.
Asserted on the modules a child process imported (``python -X importtime``), not on timings."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from skimage import data

from helpers.models import tiny_autoencoder
from helpers.paths import REPO
from illm import images

NOT_FOR_CODING = ("torch_geometric", "timm", "scipy.stats", "illm.models.vqvae", "illm.models.discriminator")


def run_python(*arguments: str, cache: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "ILLM_CACHE_DIR": str(cache)}
    command = [sys.executable, "-X", "importtime", *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)


def imported_modules(stderr: str) -> set[str]:
    """The module names that ``-X importtime`` reported."""
    return {
        line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")
    } - {"package"}  # the header line's column title


def unwanted(modules: set[str]) -> list[str]:
    return sorted(
        name for name in modules if any(name == bad or name.startswith(bad + ".") for bad in NOT_FOR_CODING)
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("startup")
    torch.save(tiny_autoencoder().state_dict(), folder / "weights.pt")
    photo = torch.from_numpy(data.astronaut()[:64, :96].copy()).permute(2, 0, 1)
    images.save_image(folder / "photo.png", photo)
    return folder


@pytest.mark.slow  # fresh interpreters
def test_compress_and_decompress_import_only_what_coding_needs(files):
    weights = ["--weights", str(files / "weights.pt"), "--device", "cpu"]
    for argv in (
        ["compress", *weights, str(files / "photo.png"), "-o", str(files / "photo.illm")],
        ["decompress", *weights, str(files / "photo.illm"), "-o", str(files / "decoded.png")],
        [
            "decompress",
            *weights,
            "--precision",
            "bf16",
            str(files / "photo.illm"),
            "-o",
            str(files / "bf16.png"),
        ],
    ):
        result = run_python("-m", "illm", *argv, cache=files / "cache")
        assert result.returncode == 0, result.stderr[-2000:]
        modules = imported_modules(result.stderr)
        assert "compressai.entropy_models" in modules and "illm.models.hific" in modules  # the parse works
        assert unwanted(modules) == [], argv[0]


@pytest.mark.slow  # a fresh interpreter
def test_zoo_load_imports_only_the_autoencoder(files):
    code = f"from illm import zoo; zoo.load({str(files / 'weights.pt')!r})"
    result = run_python("-c", code, cache=files / "cache")
    assert result.returncode == 0, result.stderr[-2000:]
    assert unwanted(imported_modules(result.stderr)) == []


@pytest.mark.slow  # fresh interpreters
def test_deferred_compressai_parts_still_import_on_use(files):
    """compressai's subpackages are stand-ins until used; used, they are the real modules."""
    code = "\n".join(
        [
            "import sys",
            "import illm.models.hific",
            "assert 'torch_geometric' not in sys.modules",
            "import compressai",
            "from compressai.models import CompressionModel",
            "import compressai.models.base as base",
            "assert CompressionModel is base.CompressionModel is compressai.models.CompressionModel",
            "assert callable(compressai.zoo.bmshj2018_factorized)",
            "assert compressai.get_entropy_coder() == 'ans'",
            "assert 'torch_geometric' in sys.modules",  # the registry imported it, as compressai does
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_scale_table_is_compressai_s():
    from compressai.models.base import get_scale_table

    from illm.models.hific import scale_table

    assert torch.equal(scale_table(), get_scale_table())
