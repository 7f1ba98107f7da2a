"""Pretrained weights: downloaded once into the torch hub cache, or a one-line error saying where
to put the file by hand.

The official MS-ILLM weights (`illm.zoo`) and the metric backbones (`illm.metrics`) both live
in ``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch/hub/checkpoints``) under the file
name of their URL, so a file fetched by torch.hub or torchvision is found here too.
"""

from __future__ import annotations

import hashlib
import sys
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import torch
from tqdm import tqdm

from illm.errors import MissingWeightsError, one_line
from illm.files import atomic_open

TIMEOUT_SECONDS = 30  # per network operation: an unreachable server fails instead of hanging
_CHUNK_BYTES = 1 << 20


def cache_path(url: str) -> Path:
    """Where the file of ``url`` lives in the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def cached_file(url: str, description: str, check_hash: bool = False) -> Path:
    """The cached file of ``url``, downloaded first if it is not there yet.

    With ``check_hash``, the file name carries a SHA-256 prefix (torchvision's convention) that
    a fresh download must match. Raises ``MissingWeightsError`` (one line, naming the URL and the
    path) when the file is neither cached nor downloadable.
    """
    path = cache_path(url)
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _fetch(url, path)
    except Exception as error:  # no network, HTTP error, disk full...: all mean "get it yourself"
        raise MissingWeightsError(
            f"{description} weights are missing: {path} does not exist and downloading it from {url} "
            f"failed ({type(error).__name__}: {one_line(error)}); put the file there by hand"
        ) from None
    if check_hash:
        expected = torch.hub.HASH_REGEX.search(path.name)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if expected and not digest.startswith(expected.group(1)):
            path.unlink()
            raise MissingWeightsError(
                f"{description} weights downloaded from {url} are corrupt (SHA-256 {digest[:8]})"
            )
    return path


def _fetch(url: str, destination: Path) -> None:
    """Download ``url`` to ``destination`` through a temporary file (never a partial file)."""
    print(f"downloading {url} to {destination}", file=sys.stderr)
    with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response, atomic_open(destination) as file:
        size = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=size, unit="B", unit_scale=True, disable=not sys.stderr.isatty()) as progress:
            while chunk := response.read(_CHUNK_BYTES):
                file.write(chunk)
                progress.update(len(chunk))
