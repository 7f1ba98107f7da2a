"""The ``illm`` command line: compress images into ``.illm`` files, decompress them, inspect them.

    illm compress   --weights W INPUT...      [-o OUT] [--device cpu|cuda] [--precision fp32|bf16] [--force]
    illm decompress --weights W INPUT.illm... [-o OUT] [--device cpu|cuda] [--precision fp32|bf16] [--force]
    illm info FILE.illm...
    illm list
    illm data check DIR [--decode]
    illm --version

``W`` is an official weights name, a state-dict file, a training checkpoint or a run folder
(see `illm.zoo.load`). ``OUT`` is a file for one input and a folder (created if needed) for
several; without it each output is written beside its input (``<stem>.illm``, ``<stem>.png``).
User errors print one line ``illm: error: ...`` and exit with status 1 (`illm.entry.run_main`).

``--help``, ``--version``, ``list`` and ``info`` answer without importing torch: the commands
that run networks import it (and the codec) when they start.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from illm import __version__, fileformat, tiling
from illm.entry import run_main
from illm.errors import IllmError
from illm.files import atomic_write_bytes

if TYPE_CHECKING:
    import torch

PROGRAM = "illm"


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    return run_main(PROGRAM, _run, argv)


def _run(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # library deprecation notices are not for users
        warnings.showwarning = _show_warning
        try:
            args.command(args)
        except Exception as error:
            if type(error).__name__ != "OutOfMemoryError":  # torch.cuda's; torch may not be imported
                raise
            raise IllmError(
                f"out of memory on {args.device}; try a smaller image or another --device"
            ) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description="MS-ILLM neural image compression.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def coding_command(name: str, run, help_text: str, input_help: str) -> None:
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(command=run)
        command.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help=input_help)
        command.add_argument(
            "--weights",
            required=True,
            metavar="W",
            help="official name (e.g. msillm_quality_3), state-dict file, training checkpoint or run folder",
        )
        command.add_argument(
            "-o",
            "--output",
            metavar="OUT",
            help="output file (one input) or folder (several inputs); default: beside each input",
        )
        command.add_argument(
            "--device",
            choices=("cpu", "cuda"),
            help="where the networks run (default: cuda when available)",
        )
        command.add_argument(
            "--precision",
            choices=("fp32", "bf16"),
            default="fp32",
            help="precision of the encoder and generator networks; the entropy coding is float32 "
            "either way, so files decode the same in both (default: fp32, identical to the official code)",
        )
        command.add_argument("-f", "--force", action="store_true", help="overwrite existing outputs")
        command.add_argument(
            "--tile",
            type=int,
            metavar="PIXELS",
            help="run the networks on tiles of this side (a multiple of 16; 0: never tile); memory then "
            f"follows the tile, not the image (default: {tiling.DEFAULT_TILE} above "
            f"{tiling.TILE_ABOVE_PIXELS / 2**20:g} MiP, else no tiling); files do not depend on it",
        )
        return command

    coding_command(
        "compress", _compress, "compress images into .illm files", "image file (PNG, JPEG, WebP, ...)"
    )
    decompress = coding_command(
        "decompress", _decompress, "decompress .illm files into PNG images", ".illm file"
    )
    decompress.add_argument(
        "--max-pixels",
        type=int,
        default=fileformat.DEFAULT_MAX_PIXELS,
        metavar="N",
        help="refuse files whose header claims more pixels than this, before any work "
        f"(default: {fileformat.DEFAULT_MAX_PIXELS}, i.e. 8192 x 8192)",
    )
    info = commands.add_parser("info", help="show the header of .illm files (no weights needed)")
    info.add_argument("files", nargs="+", type=Path, metavar="FILE")
    info.set_defaults(command=_info)
    listing = commands.add_parser("list", help="the official weights: names, target bitrates, licence")
    listing.set_defaults(command=_list)
    data = commands.add_parser("data", help="check a training or evaluation image folder")
    data_commands = data.add_subparsers(required=True, metavar="ACTION")
    check = data_commands.add_parser(
        "check",
        help="index a folder as training does; report image count, unreadable files, sizes, times",
        description="Index DIR as data.train / data.val will (the same cached index) and open every "
        "image, reporting the count, unreadable files, sizes and the index time.",
    )
    check.add_argument("folder", type=Path, metavar="DIR")
    check.add_argument(
        "--decode",
        action="store_true",
        help="decode every image fully, as the training loader does (slower; also finds truncated pixel data)",
    )
    check.add_argument(
        "--crop-size",
        type=int,
        default=256,
        metavar="N",
        help="count images smaller than this (default: 256)",
    )
    check.add_argument(
        "--workers", type=int, default=8, metavar="N", help="threads reading files (default: 8)"
    )
    check.set_defaults(command=_data_check)
    return parser


def _compress(args: argparse.Namespace) -> None:
    from illm import codec, images

    _check_device(args)
    targets = _plan_outputs(args.inputs, args.output, ".illm", args.force)
    tiling.resolve_tile(args.tile, 1, 1)
    model, model_id, load_seconds = _load_autoencoder(args.weights, args.device, args.precision)
    start = time.perf_counter()
    total_bytes = total_pixels = 0
    for source, target in _progress(args.inputs, targets, "compressing"):
        image = images.read_image(source)
        with _naming(source):
            data = codec.compress(model, images.to_float(image), model_id=model_id, tile=args.tile)
        atomic_write_bytes(target, data)
        total_bytes += len(data)
        total_pixels += image.shape[-2] * image.shape[-1]
    _summary("compressed", len(targets), total_bytes, total_pixels, time.perf_counter() - start, load_seconds)


def _decompress(args: argparse.Namespace) -> None:
    from illm import codec, images

    _check_device(args)
    targets = _plan_outputs(args.inputs, args.output, ".png", args.force)
    tiling.resolve_tile(args.tile, 1, 1)
    for source in args.inputs:  # a forged or huge header fails here, before the weights load
        with _naming(source):
            codec.check_max_pixels(codec.read_header(source.read_bytes()), args.max_pixels)
    model, model_id, load_seconds = _load_autoencoder(args.weights, args.device, args.precision)
    start = time.perf_counter()
    total_bytes = total_pixels = 0
    for source, target in _progress(args.inputs, targets, "decompressing"):
        data = source.read_bytes()
        with _naming(source):
            image = codec.decompress(
                model, data, model_id=model_id, max_pixels=args.max_pixels, tile=args.tile
            )
        images.save_image(target, image)
        total_bytes += len(data)
        total_pixels += image.shape[-2] * image.shape[-1]
    _summary(
        "decompressed", len(targets), total_bytes, total_pixels, time.perf_counter() - start, load_seconds
    )


def _info(args: argparse.Namespace) -> None:
    for path in args.files:
        with _naming(path):
            header = fileformat.read_header(path.read_bytes())
        print(
            f"{path}\n"
            f"  format version  {header.version}\n"
            f"  weights id      {header.weights_id.hex()}\n"
            f"  image size      {header.width}x{header.height} (width x height)\n"
            f"  file size       {header.file_size:,} bytes, {header.bits_per_pixel:.4f} bpp\n"
            f"  header          {header.header_size} bytes\n"
            f"  payload         {header.payload_size:,} bytes (latent and hyper strings)\n"
            f"  checksum        crc32 {header.crc:08x} ok"
        )


def _list(args: argparse.Namespace) -> None:
    from illm.official import official_models

    rows = official_models()
    width = max(len(row.name) for row in rows)
    print(f"{'name':<{width}}  {'family':<18}  {'target bpp':>10}  licence")
    for row in rows:
        print(f"{row.name:<{width}}  {row.family:<18}  {row.target_bpp or '-':>10}  {row.license}")
    print("\nThe weights download on first use (e.g. illm compress --weights msillm_quality_3 photo.png).")


def _data_check(args: argparse.Namespace) -> None:
    from illm import datacheck

    report = datacheck.check_folder(args.folder, decode=args.decode, workers=args.workers)
    print(datacheck.format_report(report, args.crop_size))


def _plan_outputs(inputs: list[Path], output: str | None, suffix: str, force: bool) -> list[Path]:
    """The output path of each input, checked before any work starts; creates output folders.

    ``output`` names a folder when there are several inputs, when it is an existing folder, or
    when it ends with a path separator; otherwise it is the one output file.
    """
    for source in inputs:
        if not source.is_file():
            raise IllmError(f"{source}: {'is a folder, not a file' if source.is_dir() else 'no such file'}")
    if output is None:
        targets = [source.with_suffix(suffix) for source in inputs]
    elif len(inputs) == 1 and not Path(output).is_dir() and not output.endswith(("/", os.sep)):
        targets = [Path(output)]
    else:
        output = Path(output)
        if output.exists() and not output.is_dir():
            raise IllmError(f"{output}: is a file; with several inputs -o must be a folder")
        targets = [output / (source.stem + suffix) for source in inputs]
    resolved = [target.resolve() for target in targets]
    for index, target in enumerate(resolved):
        if target in resolved[:index]:
            raise IllmError(f"{targets[index]}: two inputs would be written to this same output")
        if target == inputs[index].resolve():
            raise IllmError(f"{targets[index]}: the output would overwrite its input")
        if target.exists() and not force:
            raise IllmError(f"{targets[index]}: already exists (use --force to overwrite)")
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
    return targets


def _check_device(args: argparse.Namespace) -> None:
    """Settle ``args.device`` (default: cuda when available); refuse cuda where there is none."""
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise IllmError(
            "--device cuda: CUDA is not available here (no GPU, or a CPU-only PyTorch); use --device cpu"
        )


def _load_autoencoder(weights: str, device: str, precision: str) -> tuple[torch.nn.Module, bytes, float]:
    """The autoencoder, its weights id (cached per weights file), and the seconds both took."""
    from illm import zoo

    start = time.perf_counter()
    model, model_id = zoo.load_for_coding(weights, device, precision)
    return model, model_id, time.perf_counter() - start


def _progress(sources: list[Path], targets: list[Path], description: str) -> Iterable[tuple[Path, Path]]:
    from tqdm import tqdm

    pairs = list(zip(sources, targets))
    # disable=None hides the bar when stderr is not a terminal
    return tqdm(
        pairs, desc=description, unit="file", file=sys.stderr, disable=True if len(pairs) < 2 else None
    )


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Prefix the message of an `IllmError` raised inside with the file it is about."""
    try:
        yield
    except IllmError as error:
        raise type(error)(f"{path}: {error}") from None


def _summary(
    verb: str, files: int, total_bytes: int, pixels: int, seconds: float, load_seconds: float
) -> None:
    print(
        f"{verb} {files} file{'s' if files != 1 else ''}: {total_bytes:,} bytes, "
        f"{8 * total_bytes / pixels:.4f} bpp, {seconds:.2f} s (weights loaded in {load_seconds:.2f} s)"
    )


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROGRAM}: warning: {message}", file=sys.stderr)
