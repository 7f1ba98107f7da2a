"""The networks by name: official architectures, official weights, and loading any weights.

`load` accepts an official name (downloaded once into the torch hub cache), a plain state-dict
file (official or exported; the architecture is inferred from its tensor shapes), a training
checkpoint of this project, or a training run folder (its latest checkpoint). Files are always
read with ``torch.load(..., weights_only=True)``: loading weights never runs pickled code.
"""

import difflib
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from illm.checkpoint import latest_checkpoint
from illm.errors import IllmError, MissingWeightsError
from illm.models.discriminator import ConditionalUNetDiscriminator
from illm.models.hific import HiFiCAutoencoder
from illm.models.vqvae import VQVAE

OFFICIAL_URL = "https://dl.fbaipublicfiles.com/NeuralCompression/2023-muckley-msillm/"
# quality -> the bitrate target in the file name
_MSILLM_TARGETS = {
    "vlo1": "0.00218", "vlo2": "0.00438", "1": "0.035", "2": "0.07", "3": "0.14", "4": "0.3", "5": "0.45", "6": "0.9"
}
_NOGAN_TARGETS = {str(quality): _MSILLM_TARGETS[str(quality)] for quality in range(1, 7)}

OFFICIAL_WEIGHTS = {
    **{f"msillm_quality_{q}": f"{OFFICIAL_URL}msillm_target_{bpp}bpp.ckpt" for q, bpp in _MSILLM_TARGETS.items()},
    **{f"noganms_quality_{q}": f"{OFFICIAL_URL}noganms_target_{bpp}bpp.ckpt" for q, bpp in _NOGAN_TARGETS.items()},
    "vqvae_xcit_p8_ch64_cb1024_h8": f"{OFFICIAL_URL}vqvae_xcit_p8_ch64_cb1024_h8.ckpt",
}

LICENSE_NOTICE = (
    "illm: the official MS-ILLM weights (facebookresearch/NeuralCompression) are licensed under "
    "CC-BY-NC 4.0, for non-commercial use only: https://creativecommons.org/licenses/by-nc/4.0/"
)

_MODEL_CLASSES = {
    "autoencoder": HiFiCAutoencoder,
    "vqvae": VQVAE,
    "discriminator": ConditionalUNetDiscriminator,
}
_CHECKPOINT_MARK = "illm_checkpoint"
_license_shown = False


def autoencoder(**kwargs) -> HiFiCAutoencoder:
    """A HiFiC autoencoder; the official MS-ILLM architecture unless overridden."""
    return HiFiCAutoencoder(**kwargs)


def vqvae(**kwargs) -> VQVAE:
    """A VQ-VAE labeller; the official ``vqvae_xcit_p8_ch64_cb1024_h8`` architecture unless overridden."""
    return VQVAE(**kwargs)


def discriminator(**kwargs) -> ConditionalUNetDiscriminator:
    """A conditional U-Net discriminator; the official architecture unless overridden."""
    return ConditionalUNetDiscriminator(**kwargs)


def load(source: str | Path, kind: str = "autoencoder", device: str | torch.device = "cpu") -> nn.Module:
    """Load a network of ``kind`` ("autoencoder", "vqvae" or "discriminator") in eval mode.

    ``source`` is an official name (see `OFFICIAL_WEIGHTS`), a state-dict file, a training
    checkpoint, or a training run folder. An autoencoder comes back with its coder tables built
    (kept as stored when the file has them, so every machine codes with the same tables).
    """
    if kind not in _MODEL_CLASSES:
        raise IllmError(f"unknown network kind {kind!r}: expected one of {', '.join(_MODEL_CLASSES)}")
    path = _resolve(source, kind)
    state_dict = _read_state_dict(path, kind)
    try:
        model = _MODEL_CLASSES[kind].from_state_dict(state_dict)
    except IllmError as error:
        raise type(error)(f"{path}: {error}") from None
    except (KeyError, ValueError, RuntimeError) as error:
        raise IllmError(f"{path}: not {kind} weights ({_one_line(error)})") from None
    if kind == "autoencoder":
        model.update()  # on the CPU, before moving: the tables must not depend on the device
    return model.to(device).eval()


def official_path(name: str) -> Path:
    """Where the official weights ``name`` live in the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / OFFICIAL_WEIGHTS[name].rsplit("/", 1)[-1]


def _resolve(source: str | Path, kind: str) -> Path:
    """The checkpoint file that ``source`` names: download, run-folder lookup or the path itself."""
    if isinstance(source, str) and source in OFFICIAL_WEIGHTS:
        official_kind = "vqvae" if source.startswith("vqvae") else "autoencoder"
        if official_kind != kind:
            raise IllmError(f"official weights {source!r} are {official_kind} weights, not {kind} weights")
        return _download(source)
    path = Path(source)
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            expected = path / "checkpoints" / "step_<8-digit step>.pt"
            raise IllmError(f"{path}: a folder without checkpoints (expected {expected})")
        return latest
    if path.exists():
        return path
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
    path = official_path(name)
    if path.is_file():
        return path
    url = OFFICIAL_WEIGHTS[name]
    if not _license_shown:
        print(LICENSE_NOTICE, file=sys.stderr)
        _license_shown = True
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=sys.stderr.isatty())
    except Exception as error:  # no network, HTTP error, disk full...: all mean "get it yourself"
        raise MissingWeightsError(
            f"official weights {name!r} are not in the cache and could not be downloaded "
            f"({type(error).__name__}: {_one_line(error)}); download {url} on a machine with "
            f"internet and put it at {path}"
        ) from None
    return path


def _read_state_dict(path: Path, kind: str) -> dict[str, Tensor]:
    """The ``kind`` state dict in ``path``: the file itself, or the entry of a training checkpoint."""
    try:
        with warnings.catch_warnings():
            # plain pickles (protocol > 2) load fine but make torch warn about the protocol
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            content = torch.load(path, map_location="cpu", weights_only=True)
    except IsADirectoryError:
        raise IllmError(f"{path}: is a folder, not a checkpoint file") from None
    except FileNotFoundError:
        raise IllmError(f"{path}: no such file") from None
    except Exception as error:  # torch.load raises many types for a file that is not a safe checkpoint
        raise IllmError(
            f"{path}: not a PyTorch state dict or checkpoint that loads with weights_only=True "
            f"({_load_failure(error)})"
        ) from None
    if isinstance(content, Mapping) and _CHECKPOINT_MARK in content:
        models = content.get("models")
        if not isinstance(models, Mapping) or kind not in models:
            found = ", ".join(models) if isinstance(models, Mapping) else "none"
            raise IllmError(f"{path}: training checkpoint without {kind} weights (it has: {found})")
        content = models[kind]
    if not isinstance(content, Mapping) or not content or not all(
        isinstance(key, str) and isinstance(value, Tensor) for key, value in content.items()
    ):
        raise IllmError(f"{path}: not a state dict (a mapping from names to tensors) nor a training checkpoint")
    return dict(content)


def _load_failure(error: BaseException) -> str:
    """The gist of a torch.load failure: its weights-only refusal reason, else its first line."""
    refusal = re.search(r"Unsupported (global: GLOBAL \S+|operand \d+)", str(error))
    return refusal.group(0) if refusal else _one_line(error)


def _one_line(error: BaseException) -> str:
    """The first line of an error message (torch's are often paragraphs)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
