"""The networks by name: official architectures, official weights, and loading any weights.

`load` accepts an official name (downloaded once into the torch hub cache), a plain state-dict
file (official or exported; the architecture is inferred from its tensor shapes), a training
checkpoint of this project, or a training run folder (its latest checkpoint). Files are always
read with ``torch.load(..., weights_only=True)``: loading weights never runs pickled code.

Loading does only what the network needs: the file is memory-mapped and its tensors become the
autoencoder's own (no random initialisation first, no copy), the VQ-VAE and discriminator
modules (and timm) are imported only when asked for, and `load_for_coding` remembers each
weights file's `illm.codec.weights_id` so that it is computed once, not at every start.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import re
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from illm import codec
from illm.checkpoint import checkpoint_model, is_checkpoint, resolve_checkpoint
from illm.download import cache_path, cached_file
from illm.errors import IllmError, one_line
from illm.files import atomic_write_bytes
from illm.models.hific import PRECISIONS, HiFiCAutoencoder
from illm.official import LICENSE_NOTICE, OFFICIAL_ALIASES, OFFICIAL_URL, OFFICIAL_WEIGHTS  # noqa: F401

if TYPE_CHECKING:
    from illm.models.discriminator import ConditionalUNetDiscriminator
    from illm.models.vqvae import VQVAE


class _ModelClasses(Mapping):
    """Network kind -> class, importing each class's module on first use (the VQ-VAE's needs timm)."""

    _WHERE = {
        "autoencoder": ("illm.models.hific", "HiFiCAutoencoder"),
        "vqvae": ("illm.models.vqvae", "VQVAE"),
        "discriminator": ("illm.models.discriminator", "ConditionalUNetDiscriminator"),
    }

    def __getitem__(self, kind: str) -> type[nn.Module]:
        module, name = self._WHERE[kind]
        return getattr(importlib.import_module(module), name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._WHERE)

    def __len__(self) -> int:
        return len(self._WHERE)


MODEL_CLASSES = _ModelClasses()
_license_shown = False


def autoencoder(**kwargs) -> HiFiCAutoencoder:
    """A HiFiC autoencoder; the official MS-ILLM architecture unless overridden."""
    return HiFiCAutoencoder(**kwargs)


def vqvae(**kwargs) -> VQVAE:
    """A VQ-VAE labeller; the official ``vqvae_xcit_p8_ch64_cb1024_h8`` architecture unless overridden."""
    return MODEL_CLASSES["vqvae"](**kwargs)


def discriminator(**kwargs) -> ConditionalUNetDiscriminator:
    """A conditional U-Net discriminator; the official architecture unless overridden."""
    return MODEL_CLASSES["discriminator"](**kwargs)


def load(
    source: str | Path, kind: str = "autoencoder", device: str | torch.device = "cpu", precision: str = "fp32"
) -> nn.Module:
    """Load a network of ``kind`` ("autoencoder", "vqvae" or "discriminator") in eval mode.

    ``source`` is an official name (see `OFFICIAL_WEIGHTS`), a state-dict file, a training
    checkpoint, or a training run folder. An autoencoder comes back with its coder tables built
    (kept as stored when the file has them, so every machine codes with the same tables), its
    encoder and generator in ``precision`` (see `HiFiCAutoencoder.set_precision`).
    """
    model, _ = _load(source, kind, device, precision, with_weights_id=False)
    return model


def load_for_coding(
    source: str | Path, device: str | torch.device = "cpu", precision: str = "fp32"
) -> tuple[HiFiCAutoencoder, bytes]:
    """The autoencoder of ``source`` (as `load` returns it) and its `illm.codec.weights_id`.

    The id is that of the float32 weights whatever ``precision`` is, and it is cached per weights
    file (keyed by path, size, modification time and inode): it is computed at the first load of
    a file and read back afterwards.
    """
    return _load(source, "autoencoder", device, precision, with_weights_id=True)


def _load(
    source: str | Path, kind: str, device: str | torch.device, precision: str, with_weights_id: bool
) -> tuple[nn.Module, bytes | None]:
    if kind not in MODEL_CLASSES:
        raise IllmError(f"unknown network kind {kind!r}: expected one of {', '.join(MODEL_CLASSES)}")
    if precision not in PRECISIONS or (kind != "autoencoder" and precision != "fp32"):
        choices = ", ".join(PRECISIONS)
        if kind != "autoencoder":
            choices = "fp32 (precision is for the autoencoder)"
        raise IllmError(f"unknown precision {precision!r} for {kind} weights: expected {choices}")
    path = _resolve(source, kind)
    file_key = _file_key(path) if with_weights_id else None  # taken before reading: see _remember_weights_id
    state_dict = _read_state_dict(path, kind)
    try:
        if kind == "autoencoder":  # the big one: take the mapped tensors as they are
            model = HiFiCAutoencoder.from_state_dict(state_dict, assign=True)
        else:
            model = MODEL_CLASSES[kind].from_state_dict(state_dict)
    except IllmError as error:
        raise type(error)(f"{path}: {error}") from None
    except (KeyError, ValueError, RuntimeError) as error:
        raise IllmError(f"{path}: not {kind} weights ({one_line(error)})") from None
    model_id = None
    if kind == "autoencoder":
        model.update()  # on the CPU, before moving: the tables must not depend on the device
        if with_weights_id:
            model_id = _weights_ids().get(file_key)
            if model_id is None:
                model_id = codec.weights_id(model)  # of the float32 weights, before set_precision
                _remember_weights_id(path, file_key, model_id)
        model.set_precision(precision)
    return model.to(device).eval(), model_id


def official_path(name: str) -> Path:
    """Where the official weights ``name`` live in the torch hub cache."""
    return cache_path(OFFICIAL_WEIGHTS[name])


def _resolve(source: str | Path, kind: str) -> Path:
    """The checkpoint file that ``source`` names: download, run-folder lookup or the path itself."""
    if isinstance(source, str):
        source = OFFICIAL_ALIASES.get(source, source)
    if isinstance(source, str) and source in OFFICIAL_WEIGHTS:
        official_kind = "vqvae" if source.startswith("vqvae") else "autoencoder"
        if official_kind != kind:
            raise IllmError(f"official weights {source!r} are {official_kind} weights, not {kind} weights")
        return _download(source)
    path = Path(source)
    if path.exists():
        return resolve_checkpoint(path)
    if isinstance(source, str) and not _looks_like_path(source):
        close = difflib.get_close_matches(source, OFFICIAL_WEIGHTS, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise IllmError(
            f"{source!r} is neither an official weights name nor an existing file or folder; {hint}"
            f"official names: {', '.join(OFFICIAL_WEIGHTS)}"
        )
    raise IllmError(f"{path}: no such file or folder")


def _looks_like_path(source: str) -> bool:
    return "/" in source or "\\" in source or Path(source).suffix != ""


def _download(name: str) -> Path:
    global _license_shown
    if not _license_shown and not official_path(name).is_file():
        print(LICENSE_NOTICE, file=sys.stderr)
        _license_shown = True
    return cached_file(OFFICIAL_WEIGHTS[name], f"the official {name}")


def _read_state_dict(path: Path, kind: str) -> dict[str, Tensor]:
    """The ``kind`` state dict in ``path``: the file itself, or the entry of a training checkpoint."""
    try:
        with warnings.catch_warnings():
            # plain pickles (protocol > 2) load fine but make torch warn about the protocol
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            content = _torch_load(path)
    except IsADirectoryError:
        raise IllmError(f"{path}: is a folder, not a checkpoint file") from None
    except FileNotFoundError:
        raise IllmError(f"{path}: no such file") from None
    except Exception as error:  # torch.load raises many types for a file that is not a safe checkpoint
        raise IllmError(
            f"{path}: not a PyTorch state dict or checkpoint that loads with weights_only=True "
            f"({_load_failure(error)})"
        ) from None
    if is_checkpoint(content):
        content = checkpoint_model(content, path, kind)
    if (
        not isinstance(content, Mapping)
        or not content
        or not all(isinstance(key, str) and isinstance(value, Tensor) for key, value in content.items())
    ):
        raise IllmError(
            f"{path}: not a state dict (a mapping from names to tensors) nor a training checkpoint"
        )
    return dict(content)


def _torch_load(path: Path):
    """``torch.load`` memory-mapped (tensors are read from the page cache as they are used), or
    plainly for the files that cannot be mapped (the legacy, non-zip format)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (IsADirectoryError, FileNotFoundError):
        raise
    except Exception:
        return torch.load(path, map_location="cpu", weights_only=True)


def weights_id_cache_path() -> Path:
    """The file of remembered weights ids: ``$ILLM_CACHE_DIR/weights_ids.json``, by default in
    ``$XDG_CACHE_HOME/illm`` (``~/.cache/illm``)."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "illm"
    return Path(os.environ.get("ILLM_CACHE_DIR") or default) / "weights_ids.json"


_WEIGHTS_ID_CACHE_ENTRIES = 256  # the most recent files are kept


def _file_key(path: Path) -> str:
    """What identifies one version of a file: a rewrite changes its size, time or inode."""
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|{_compressai_version()}"


def _compressai_version() -> str:
    # the coder tables that `update()` adds to files without them come from compressai
    return getattr(sys.modules.get("compressai"), "__version__", "")


def _weights_ids() -> dict[str, bytes]:
    """The remembered ids; an unreadable or malformed cache counts as empty."""
    try:
        entries = json.loads(weights_id_cache_path().read_text())
        return {key: bytes.fromhex(value) for key, value in entries.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _remember_weights_id(path: Path, file_key: str, model_id: bytes) -> None:
    """Cache ``model_id`` for the file version ``file_key``, if the file still is that version
    (one rewritten while it was read must not get the id of either content)."""
    if _file_key(path) != file_key:
        return
    entries = {key: value.hex() for key, value in _weights_ids().items() if key != file_key}
    entries[file_key] = model_id.hex()
    cache = weights_id_cache_path()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        recent = dict(list(entries.items())[-_WEIGHTS_ID_CACHE_ENTRIES:])
        atomic_write_bytes(cache, json.dumps(recent).encode())
    except OSError:
        pass  # a read-only cache only costs the hash at the next start


def _load_failure(error: BaseException) -> str:
    """The gist of a torch.load failure: its weights-only refusal reason, else its first line."""
    refusal = re.search(r"Unsupported (global: GLOBAL \S+|operand \d+)", str(error))
    return refusal.group(0) if refusal else one_line(error)
