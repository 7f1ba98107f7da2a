"""Weights downloads into the torch hub cache, offline: file:// URLs stand in for the server."""

import hashlib

import pytest

from illm import download
from illm.errors import MissingWeightsError


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_a_file_is_downloaded_once_into_the_hub_cache(tmp_path, hub, monkeypatch):
    source = tmp_path / "server" / "weights.pt"
    source.parent.mkdir()
    source.write_bytes(b"weights")
    assert download.cached_file(source.as_uri(), "test") == hub / "weights.pt"
    assert (hub / "weights.pt").read_bytes() == b"weights"
    source.unlink()  # from now on the cache answers
    assert download.cached_file(source.as_uri(), "test").read_bytes() == b"weights"


def test_a_download_that_fails_leaves_nothing_and_says_where_to_put_the_file(tmp_path, hub):
    url = (tmp_path / "server" / "absent.pt").as_uri()
    with pytest.raises(MissingWeightsError) as error:
        download.cached_file(url, "Absent")
    message = str(error.value)
    assert "\n" not in message and url in message and str(hub / "absent.pt") in message
    assert not any(hub.iterdir())


def test_a_download_with_the_wrong_hash_is_removed(tmp_path, hub):
    wrong_prefix = hashlib.sha256(b"other").hexdigest()[:8]
    source = tmp_path / f"net-{wrong_prefix}.pth"
    source.write_bytes(b"weights")
    with pytest.raises(MissingWeightsError, match="corrupt"):
        download.cached_file(source.as_uri(), "Hashed", check_hash=True)
    assert not (hub / source.name).exists()
    right_prefix = hashlib.sha256(b"weights").hexdigest()[:8]
    good = source.rename(tmp_path / f"net-{right_prefix}.pth")
    assert download.cached_file(good.as_uri(), "Hashed", check_hash=True).read_bytes() == b"weights"
