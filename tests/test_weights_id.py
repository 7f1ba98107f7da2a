"""The weights id that `zoo.load_for_coding` remembers per weights file, and files made before
it existed: the cache must give exactly the id that `codec.weights_id` computes."""

import os
from pathlib import Path

import pytest
import torch
from skimage import data

from helpers.models import TINY_AUTOENCODER, tiny_autoencoder
from helpers.paths import REFERENCE_DIR
from illm import codec, images, zoo
from illm.cli import main

REFERENCE = REFERENCE_DIR / "codec_v1"
WEIGHTS_ID = codec.weights_id  # uncounted, for the expected values


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ILLM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def hash_calls(monkeypatch):
    """Counts the calls of `codec.weights_id` (the hash of every weight)."""
    calls = []
    compute = codec.weights_id

    def counted(model):
        calls.append(model)
        return compute(model)

    monkeypatch.setattr(codec, "weights_id", counted)
    return calls


def fresh_id(path: Path) -> bytes:
    """The id as computed before the cache existed: hash the loaded, updated model."""
    return WEIGHTS_ID(zoo.load(path))


@pytest.mark.parametrize("with_tables", [True, False])
def test_cached_id_is_the_computed_id(tmp_path, hash_calls, with_tables):
    """With coder tables stored, and without (then `update()` builds them before hashing)."""
    torch.manual_seed(3)
    model = zoo.autoencoder(**TINY_AUTOENCODER).eval()
    if with_tables:
        model.update(force=True)
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    _, first = zoo.load_for_coding(path)
    _, second = zoo.load_for_coding(path)
    assert len(hash_calls) == 1  # the second load read the id back
    model.update()
    assert first == second == fresh_id(path) == WEIGHTS_ID(model)


def test_unchanged_file_skips_the_hash_changed_file_gets_a_new_id(tmp_path, hash_calls, cache_dir):
    path = tmp_path / "weights.pt"
    torch.save(tiny_autoencoder(seed=0).state_dict(), path)
    _, first = zoo.load_for_coding(path)
    for precision in ("fp32", "bf16"):
        _, again = zoo.load_for_coding(path, precision=precision)
        assert again == first
    assert len(hash_calls) == 1
    assert (cache_dir / "weights_ids.json").is_file()

    torch.save(tiny_autoencoder(seed=1).state_dict(), path)  # same size, other weights
    _, changed = zoo.load_for_coding(path)
    assert len(hash_calls) == 2
    assert changed != first and changed == fresh_id(path)

    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # touched: hashed again, same id
    assert zoo.load_for_coding(path)[1] == changed
    assert len(hash_calls) == 3


def test_the_id_is_that_of_the_float32_weights(tmp_path, hash_calls):
    """bf16 weights hash differently, so the id must come from the weights as stored."""
    path = tmp_path / "weights.pt"
    torch.save(tiny_autoencoder(seed=2).state_dict(), path)
    model, model_id = zoo.load_for_coding(path, precision="bf16")
    assert model.decoder.blocks[-1].weight.dtype == torch.bfloat16
    assert model_id == fresh_id(path) != WEIGHTS_ID(model)


def test_unusable_cache_is_recomputed(tmp_path, cache_dir, hash_calls):
    path = tmp_path / "weights.pt"
    torch.save(tiny_autoencoder(seed=0).state_dict(), path)
    cache_dir.mkdir()
    for content in ("not json", '{"a": "zz"}', "[1, 2]"):
        (cache_dir / "weights_ids.json").write_text(content)
        assert zoo.load_for_coding(path)[1] == fresh_id(path)
    assert zoo.load_for_coding(path)[1] == fresh_id(path)
    assert len(hash_calls) == 3  # one per broken cache, none once it was rewritten


def test_a_file_made_before_the_cache_still_decodes(tmp_path, capsys):
    """tests/reference/codec_v1 was written by the code before this cache and before bf16:
    a tiny never-updated state dict, a crop of the astronaut and its .illm file and decoding."""
    expected = images.read_image(REFERENCE / "decoded.png")
    for precision in ("fp32", "bf16"):
        output = tmp_path / f"{precision}.png"
        argv = ["decompress", "--weights", str(REFERENCE / "weights.pt"), str(REFERENCE / "photo.illm")]
        assert main([*argv, "-o", str(output), "--precision", precision, "--device", "cpu"]) == 0
        decoded = images.read_image(output)
        difference = (decoded.int() - expected.int()).abs()
        if precision == "fp32":  # the same latent through the same float32 generator
            assert difference.max() <= 1 and difference.float().mean() < 0.01
        else:
            assert difference.float().mean() < 2
    model, model_id = zoo.load_for_coding(REFERENCE / "weights.pt")
    header = codec.read_header((REFERENCE / "photo.illm").read_bytes())
    assert header.weights_id == model_id
    photo = images.to_float(torch.from_numpy(data.astronaut()[100:196, 180:308].copy()).permute(2, 0, 1))
    assert codec.compress(model, photo, model_id=model_id) == (REFERENCE / "photo.illm").read_bytes()
