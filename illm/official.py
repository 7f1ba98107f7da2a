"""The official MS-ILLM weights by name (facebookresearch/NeuralCompression): a table, without torch.

`illm.zoo` loads them; ``illm list`` prints this table.
"""

from __future__ import annotations

from dataclasses import dataclass

OFFICIAL_URL = "https://dl.fbaipublicfiles.com/NeuralCompression/2023-muckley-msillm/"
# quality -> the bitrate target in the file name
_MSILLM_TARGETS = {
    "vlo1": "0.00218",
    "vlo2": "0.00438",
    "1": "0.035",
    "2": "0.07",
    "3": "0.14",
    "4": "0.3",
    "5": "0.45",
    "6": "0.9",
}
_NOGAN_TARGETS = {str(quality): _MSILLM_TARGETS[str(quality)] for quality in range(1, 7)}

OFFICIAL_WEIGHTS = {
    **{
        f"msillm_quality_{q}": f"{OFFICIAL_URL}msillm_target_{bpp}bpp.ckpt"
        for q, bpp in _MSILLM_TARGETS.items()
    },
    **{
        f"noganms_quality_{q}": f"{OFFICIAL_URL}noganms_target_{bpp}bpp.ckpt"
        for q, bpp in _NOGAN_TARGETS.items()
    },
    "vqvae_xcit_p8_ch64_cb1024_h8": f"{OFFICIAL_URL}vqvae_xcit_p8_ch64_cb1024_h8.ckpt",
}

# torch.hub names of the official repository (hubconf.py) that differ from the file names above.
OFFICIAL_ALIASES = {"msillm_vqvae_xcit_p8_ch64_cb1024_h8": "vqvae_xcit_p8_ch64_cb1024_h8"}

LICENSE_NOTICE = (
    "illm: the official MS-ILLM weights (facebookresearch/NeuralCompression) are licensed under "
    "CC-BY-NC 4.0, for non-commercial use only: https://creativecommons.org/licenses/by-nc/4.0/"
)

LICENSE = "CC-BY-NC 4.0"


@dataclass(frozen=True)
class OfficialModel:
    """One row of ``illm list``."""

    name: str
    family: str
    target_bpp: str  # as in the file name; "" for the labeller
    license: str = LICENSE


def official_models() -> list[OfficialModel]:
    """Every official name with its family and target bitrate (the hub names of the labeller too)."""
    rows = [OfficialModel(f"msillm_quality_{q}", "MS-ILLM", bpp) for q, bpp in _MSILLM_TARGETS.items()]
    rows += [
        OfficialModel(f"noganms_quality_{q}", "No-GAN (MSE+LPIPS)", bpp) for q, bpp in _NOGAN_TARGETS.items()
    ]
    rows += [
        OfficialModel(name, "VQ-VAE labeller", "")
        for name in ("vqvae_xcit_p8_ch64_cb1024_h8", *OFFICIAL_ALIASES)
    ]
    return rows
