"""Export a trained model in the release format: a plain state dict, like the official weights.

    python scripts/export.py RUN_OR_CHECKPOINT -o weights.pt [--checkpoint best|latest|STEP]
        [--kind autoencoder|vqvae|discriminator]

From a run folder, ``--checkpoint`` picks the checkpoint: ``latest`` (the default), ``best``
(``checkpoints/best.pt``, the best validation value of ``checkpoint.best_metric`` so far) or a
step number (``checkpoints/step_%08d.pt``, if it is still kept).

An autoencoder is exported after `update()` (the coder tables are built), so the file is
ready for `illm compress --weights weights.pt` and `illm.zoo.load`; a stage-0 run exports
its VQ-VAE labeller in the official VQ-VAE format.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import torch

from illm.checkpoint import STEP_FILE, read_checkpoint, resolve_checkpoint, step_checkpoints
from illm.entry import run_main
from illm.errors import IllmError
from illm.files import atomic_write_bytes
from illm.zoo import MODEL_CLASSES


def export(
    source: str | Path, output: str | Path, kind: str | None = None, checkpoint: str = "latest"
) -> tuple[str, Path]:
    """Write the plain state dict of `kind` (default: the autoencoder, else the VQ-VAE) of the
    checkpoint file `source`, or of the `checkpoint` ("latest", "best" or a step) of run folder `source`."""
    path = select_checkpoint(source, checkpoint)
    models = read_checkpoint(path)["models"]
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


def select_checkpoint(source: str | Path, which: str = "latest") -> Path:
    """The checkpoint `which` ("latest", "best" or a step number) of run folder `source`;
    `source` itself when it is a checkpoint file and `which` is "latest"."""
    source = Path(source)
    if which == "latest":
        return resolve_checkpoint(source)
    if not source.is_dir():
        raise IllmError(f"--checkpoint {which}: needs a run folder, but {source} is not a folder")
    if which == "best":
        best = source / "checkpoints" / "best.pt"
        if not best.is_file():
            raise IllmError(
                f"{source}: no {best.relative_to(source)} yet (it appears at the first validation)"
            )
        return best
    if not which.isdigit():
        raise IllmError(f"--checkpoint: expected best, latest or a step number, got '{which}'")
    steps = {int(STEP_FILE.match(p.name).group(1)): p for p in step_checkpoints(source)}
    if int(which) not in steps:
        kept = ", ".join(str(step) for step in steps) or "none"
        raise IllmError(f"{source}: no checkpoint of step {int(which)} (kept steps: {kept})")
    return steps[int(which)]


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    return run_main("export.py", _main, argv)


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="export.py", description="Export a training run or checkpoint as a plain weights file."
    )
    parser.add_argument("source", help="a run folder or a checkpoint file")
    parser.add_argument("-o", "--output", required=True, help="the weights file to write")
    parser.add_argument(
        "--checkpoint",
        default="latest",
        metavar="best|latest|STEP",
        help="which checkpoint of a run folder: the latest (default), best.pt, or that of a step",
    )
    parser.add_argument(
        "--kind",
        choices=sorted(MODEL_CLASSES),
        help="which model to export (default: the autoencoder if present)",
    )
    args = parser.parse_args(argv)
    kind, path = export(args.source, args.output, args.kind, args.checkpoint)
    print(f"exported the {kind} of {path} to {args.output}")
