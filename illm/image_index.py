"""Finding the images of a folder, with a cached listing.

A dataset of 1.7M files is listed once: ``find_images`` stores the listing in
``<root>/.illm/image_index.txt`` (or under ``$XDG_CACHE_HOME/illm/`` when the folder is
read-only) together with the mtime of every folder it scanned, and reuses it while none of
those folders has changed.
"""

import hashlib
import logging
import os
import time
from pathlib import Path

from illm.errors import IllmError
from illm.files import atomic_write_bytes
from illm.images import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

INDEX_DIRNAME = ".illm"
INDEX_FILENAME = "image_index.txt"
_INDEX_FORMAT = "illm-image-index-v1"
# Directory timestamps are coarse (a kernel tick, 1-2 s on some network/FAT file systems): a
# directory changed within this margin of a scan could change again without its mtime moving.
_RACY_NS = 2_000_000_000


def find_images(root: str | os.PathLike) -> list[str]:
    """Sorted paths (relative to ``root``) of the image files under ``root``, recursively.

    Images are the files named with one of ``IMAGE_EXTENSIONS`` (any case); hidden files and
    folders (names starting with ".") are ignored. The listing is cached in
    ``<root>/.illm/image_index.txt`` or, when ``root`` is not writable, in
    ``$XDG_CACHE_HOME/illm/`` (default ``~/.cache/illm/``) under a hash of the absolute path.

    Cache rule: a folder's mtime changes whenever an entry is added to, removed from or renamed
    in it, so the index stores the mtime of every folder it scanned and is reused only while all
    of them are unchanged -- a ``stat`` per folder, not a listing of 1.7M files. Files edited in
    place do not change the listing, so they need no rescan. No index is written while a folder
    was modified less than 2 s before the scan (timestamps are coarse: a change made during the
    scan might not move them; this assumes the file server's clock agrees with this machine's),
    so a folder is rescanned until it has been left alone for 2 s -- e.g. the second start
    scans again, because the first one created ``<root>/.illm``. Writes are atomic (a rename).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "does not exist"
        raise IllmError(f"image folder {root} {problem}")
    local_index = root / INDEX_DIRNAME / INDEX_FILENAME
    home_index = _home_index_path(root)
    for index_path, expected_root in ((local_index, None), (home_index, _canonical(root))):
        images = _read_index(index_path, expected_root)
        if images is not None:
            return images

    created_index_dir = _make_index_dir(local_index.parent)  # before the scan: it changes root's mtime
    scan_started_ns = time.time_ns()
    dir_mtimes, images = _scan(root)
    if not images:
        if created_index_dir:
            local_index.parent.rmdir()
        raise IllmError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}")
    if any(mtime >= scan_started_ns - _RACY_NS for mtime in dir_mtimes.values()):
        logger.debug("not caching the image index of %s: a folder changed during the scan", root)
        return images
    text = _format_index(_canonical(root), scan_started_ns, dir_mtimes, images)
    for index_path in (local_index, home_index):
        try:
            _write_atomically(index_path, text)
            break
        except OSError as error:
            logger.debug("cannot write image index %s: %s", index_path, error)
    else:
        logger.warning("cannot cache the image index of %s; it will be rescanned next time", root)
    return images


def _canonical(root: Path) -> str:
    return os.path.realpath(root)


def _home_index_path(root: Path) -> Path:
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(_canonical(root).encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return cache_home / "illm" / f"image_index-{key}.txt"


def _make_index_dir(path: Path) -> bool:
    """Create the in-folder index directory if possible; True when this call created it."""
    try:
        path.mkdir()
        return True
    except OSError:  # exists already, or the dataset is read-only (then the home cache is used)
        return False


def _scan(root: Path) -> tuple[dict[str, int], list[str]]:
    """Walk ``root``: (mtime_ns of every folder visited, by relative path; sorted image paths)."""
    dir_mtimes: dict[str, int] = {}
    images: list[str] = []
    visited: set[tuple[int, int]] = set()  # (device, inode): symlinked folders may form loops
    pending = [""]
    while pending:
        rel_dir = pending.pop()
        folder = os.path.join(root, rel_dir)
        try:
            # stat before listing, so that a change made during the listing shows in the mtime
            stat = os.stat(folder)
            if (stat.st_dev, stat.st_ino) in visited:
                continue
            visited.add((stat.st_dev, stat.st_ino))
            dir_mtimes[rel_dir] = stat.st_mtime_ns
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith(".") or "\n" in entry.name:
                        continue
                    rel_path = os.path.join(rel_dir, entry.name)
                    if entry.is_dir():
                        pending.append(rel_path)
                    elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                        images.append(rel_path)
        except OSError as error:
            raise IllmError(f"cannot list image folder {folder}: {error.strerror or error}") from None
    return dir_mtimes, sorted(images)


def _format_index(root: str, scanned_ns: int, dir_mtimes: dict[str, int], images: list[str]) -> str:
    lines = [_INDEX_FORMAT, f"root\t{root}", f"scanned_ns\t{scanned_ns}", f"dirs\t{len(dir_mtimes)}"]
    lines += [f"{mtime}\t{rel_dir}" for rel_dir, mtime in sorted(dir_mtimes.items())]
    lines += [f"images\t{len(images)}", *images, "end", ""]
    return "\n".join(lines)


def _read_index(path: Path, expected_root: str | None) -> list[str] | None:
    """The images listed by a cached index, or None if it is missing, damaged or stale."""
    try:
        lines = path.read_text(encoding="utf-8", errors="surrogateescape").split("\n")
        if lines[0] != _INDEX_FORMAT or lines[-2:] != ["end", ""]:
            return None
        indexed_root = lines[1].split("\t", 1)[1]
        num_dirs = int(lines[3].split("\t", 1)[1])
        dir_mtimes = [line.split("\t", 1) for line in lines[4 : 4 + num_dirs]]
        dir_mtimes = {rel_dir: int(mtime) for mtime, rel_dir in dir_mtimes}
        num_images = int(lines[4 + num_dirs].split("\t", 1)[1])
        images = lines[5 + num_dirs : -2]
    except (OSError, IndexError, ValueError):
        return None
    if len(images) != num_images or (expected_root is not None and indexed_root != expected_root):
        return None
    root = path.parent.parent if expected_root is None else Path(expected_root)
    for rel_dir, mtime in dir_mtimes.items():
        try:
            if os.stat(os.path.join(root, rel_dir)).st_mtime_ns != mtime:
                return None
        except OSError:
            return None
    return images


def _write_atomically(path: Path, text: str) -> None:
    """Readers never see a partial index (see `illm.files.atomic_open`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))
