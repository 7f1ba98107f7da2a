"""Export a trained model in the release format: a plain state dict, like the official weights.

    python scripts/export.py RUN_OR_CHECKPOINT -o weights.pt [--kind autoencoder|vqvae|discriminator]

An autoencoder is exported after `update()` (the coder tables are built), so the file is
ready for `illm compress --weights weights.pt` and `illm.zoo.load`; a stage-0 run exports
its VQ-VAE labeller in the official VQ-VAE format.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import torch

from illm.checkpoint import read_checkpoint, resolve_checkpoint
from illm.errors import IllmError
from illm.files import atomic_write_bytes
from illm.zoo import MODEL_CLASSES


def export(source: str | Path, output: str | Path, kind: str | None = None) -> tuple[str, Path]:
    """Write the plain state dict of `kind` (default: the autoencoder, else the VQ-VAE)."""
    path = resolve_checkpoint(source)
    checkpoint = read_checkpoint(path)
    models = checkpoint["models"]
    kind = kind or next((k for k in MODEL_CLASSES if k in models), None)
    if kind not in models or kind not in MODEL_CLASSES:
        raise IllmError(f"{path}: holds no {kind or 'exportable'} model (it has: {', '.join(models)})")
    model = MODEL_CLASSES[kind].from_state_dict(models[kind])
    if kind == "autoencoder":
        model.update(force=True)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    output = Path(output)
    atomic_write_bytes(output, buffer.getvalue())
    return kind, path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="export.py", description="Export a training run or checkpoint as a plain weights file."
    )
    parser.add_argument("source", help="a run folder (its latest checkpoint) or a checkpoint file")
    parser.add_argument("-o", "--output", required=True, help="the weights file to write")
    parser.add_argument(
        "--kind",
        choices=sorted(MODEL_CLASSES),
        help="which model to export (default: the autoencoder if present)",
    )
    args = parser.parse_args(argv)
    try:
        kind, path = export(args.source, args.output, args.kind)
    except IllmError as error:
        print(f"export: error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"exported the {kind} of {path} to {args.output}")
