"""``illm data check DIR``: index an image folder the way training will, and find the files that
training would skip, before a week-long run meets them on day three.

The listing is `illm.image_index.find_images` (the same cached index `data.train` uses). Each file
is then opened: by default its header only (size and format, fast), with ``--decode`` fully
decoded by `illm.data.decode_rgb`, exactly as the training loader does (slower; finds truncated
pixel data too).
"""

from __future__ import annotations

import io
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from illm.errors import one_line
from illm.fileformat import MAX_PIXELS
from illm.image_index import find_images


@dataclass
class FolderReport:
    """What `check_folder` found."""

    root: Path
    index_seconds: float
    check_seconds: float
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of readable images
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    total_bytes: int = 0

    @property
    def count(self) -> int:
        return len(self.sizes) + len(self.unreadable)


def check_folder(root: str | Path, decode: bool = False, workers: int = 8) -> FolderReport:
    """Index ``root`` as training does and open every image (header, or full decode)."""
    root = Path(root)
    start = time.perf_counter()
    paths = find_images(root)
    indexed = time.perf_counter()
    opener = _decoded_size if decode else _header_size
    report = FolderReport(root, indexed - start, 0.0)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # the work is mostly file I/O
        for relative, (size, nbytes, reason) in zip(
            paths, pool.map(lambda p: _open(root / p, opener), paths)
        ):
            report.total_bytes += nbytes
            if reason is None:
                report.sizes.append(size)
            else:
                report.unreadable.append((relative, reason))
    report.check_seconds = time.perf_counter() - indexed
    return report


def _open(path: Path, opener) -> tuple[tuple[int, int] | None, int, str | None]:
    try:
        data = path.read_bytes()
        return opener(data), len(data), None
    except Exception as error:  # anything a loader worker would hit makes the file unreadable
        return None, 0, one_line(error)


def _header_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    if width * height > MAX_PIXELS:
        raise ValueError(f"{width}x{height} pixels is more than the limit of {MAX_PIXELS}")
    return width, height


def _decoded_size(data: bytes) -> tuple[int, int]:
    from illm.data import decode_rgb

    image = decode_rgb(data)
    return image.shape[-1], image.shape[-2]


def format_report(report: FolderReport, crop_size: int, shown: int = 20) -> str:
    """The report as text: counts, sizes, times, and the first ``shown`` unreadable files."""
    lines = [
        f"{report.root}",
        f"  images          {report.count:,} ({report.total_bytes / 2**30:.2f} GiB)",
        f"  unreadable      {len(report.unreadable):,}",
    ]
    if report.sizes:
        short = sorted(min(w, h) for w, h in report.sizes)
        pixels = [w * h for w, h in report.sizes]
        small = sum(side < crop_size for side in short)
        lines += [
            f"  short side      min {short[0]}, median {statistics.median(short):g}, max {short[-1]} pixels",
            f"  megapixels      min {min(pixels) / 1e6:.2f}, median {statistics.median(pixels) / 1e6:.2f}, "
            f"max {max(pixels) / 1e6:.2f}",
            f"  under crop      {small:,} with a side shorter than {crop_size} (data.crop_size)",
        ]
    lines += [
        f"  index time      {report.index_seconds:.2f} s (cached for the next start)",
        f"  check time      {report.check_seconds:.2f} s",
    ]
    for relative, reason in report.unreadable[:shown]:
        lines.append(f"  unreadable: {relative}: {reason}")
    if len(report.unreadable) > shown:
        lines.append(f"  ... and {len(report.unreadable) - shown} more")
    return "\n".join(lines)
