"""Training data: image folders -> dataset -> loader.

Pipeline: ``illm.image_index.find_images`` lists a folder once (the listing is cached),
``ImageFolder`` decodes files with libjpeg-turbo / libpng (``torchvision.io``; PIL as fallback),
skips unreadable files instead of failing, and ``make_loader`` batches with ``collate_skip_bad``
into ``Batch(images, num_skipped)`` (validation: ``collate_masked``, with a validity mask).
``train_dataset`` / ``val_dataset`` build a run's datasets from its ``data`` config section:
the whole folder, or the images a list file names (``image_list``).

Epochs and resumption (with Accelerate): the order of an epoch and every sample's random
augmentation are pure functions of ``(seed, epoch)`` (``EpochSampler`` hands out
``SampleIndex``es that carry a per-sample seed), independent of worker processes, prefetching
and of where a run was resumed. Call ``loader.set_epoch(epoch)`` on the prepared loader at the
start of every epoch (Accelerate forwards it to the sampler, also across processes); to resume
mid-epoch call ``loader.set_epoch(epoch)`` and then iterate
``accelerate.skip_first_batches(loader, batches_done)``.
"""

import io
import logging
import os
import random
import re
import warnings
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from illm.errors import ConfigError, IllmError, one_line
from illm.experiment import CROP_MODES, VAL_TRANSFORMS
from illm.image_index import find_images
from illm.images import IMAGE_EXTENSIONS, MAX_PIXELS
from illm.loop import accumulation_steps

logger = logging.getLogger(__name__)

OFFICIAL_INVALID_FILE = "openimages_v6_invalid_train_images.txt"

# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def decode_rgb(data: bytes, max_pixels: int = MAX_PIXELS) -> Tensor:
    """Decode image bytes (JPEG/PNG/WebP fast, the other formats through Pillow) into a 3xHxW uint8 tensor (uint16 for 16-bit PNG).

    Grayscale, palette, CMYK and alpha images are converted to RGB (alpha is dropped). Raises
    ValueError (not an image, or too large) or OSError/RuntimeError (damaged image).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size check is ours
        # torchvision 0.29 deprecates its decoders for TorchCodec (not a dependency here); they
        # still work and are the fast path.
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities", DeprecationWarning)
        try:
            with Image.open(io.BytesIO(data)) as probe:  # header only: cheap next to decoding
                width, height = probe.size
        except Image.UnidentifiedImageError:
            raise ValueError("not an image Pillow can read") from None
        if width * height > max_pixels:
            raise ValueError(f"{width}x{height} pixels is more than the limit of {max_pixels}")
        try:
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            return _decode_rgb_with_pil(data)


def _decode_rgb_with_pil(data: bytes) -> Tensor:
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("RGB"))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def _describe(error: Exception) -> str:
    """A one-line reason, without the C++ source location that torchvision's errors start with."""
    return re.sub(r"^.*?\.cpp:\d+, ", "", one_line(error))


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------


class ImageFolder(Dataset):
    """Images under a folder (see ``find_images``) as 3xHxW float32 RGB tensors in [0, 1].

    ``transform`` (e.g. ``train_transform``) gets the decoded uint8 (or uint16) tensor; its output
    is converted to float. Indexed with a ``SampleIndex``, the transform draws its random numbers
    from that sample's seed, so the same (index, seed) always gives the same tensor; with a plain
    int, from the global torch RNG.

    ``images``: the paths (relative to ``root``) to read instead of every image under ``root``
    (see ``image_list``).

    An unreadable, corrupt or oversized file yields ``None`` (``collate_skip_bad`` drops it,
    ``collate_masked`` masks it), is logged once, and is remembered in a table shared with loader
    worker processes: ``bad_files()`` in the main process lists them.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Tensor], Tensor] | None = None,
        max_pixels: int = MAX_PIXELS,
        images: list[str] | None = None,
    ):
        self.root = Path(root).expanduser()
        self.transform = transform
        self.max_pixels = max_pixels
        # One NUL-separated bytes blob instead of 1.7M Python strings: reading list items in
        # forked workers touches their refcounts, which copies the whole list into every worker.
        paths = find_images(self.root) if images is None else images
        self._path_blob = "\0".join(paths).encode("utf-8", "surrogateescape") + b"\0"
        self._path_ends = np.flatnonzero(np.frombuffer(self._path_blob, dtype=np.uint8) == 0)
        self._known_bad = torch.zeros(len(self._path_ends), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self._path_ends)

    def relative_path(self, index: int) -> str:
        """Path of image ``index`` relative to ``root``."""
        start = int(self._path_ends[index - 1]) + 1 if index > 0 else 0
        return self._path_blob[start : int(self._path_ends[index])].decode("utf-8", "surrogateescape")

    def __getitem__(self, index: int) -> Tensor | None:
        if self._known_bad[index]:
            return None
        path = self.root / self.relative_path(index)
        try:
            image = decode_rgb(path.read_bytes(), self.max_pixels)
        except Exception as error:  # one bad file among millions must not stop a training run
            self._known_bad[index] = True
            logger.warning("skipping unreadable image %s: %s", path, _describe(error))
            return None
        if self.transform is not None:
            image = self._transform(image, getattr(index, "seed", None))
        return TF.to_dtype(image, torch.float32, scale=True)

    def _transform(self, image: Tensor, seed: int | None) -> Tensor:
        if seed is None:
            return self.transform(image)
        # torchvision transforms draw from the global CPU generator: seed it for this sample and
        # give the caller's stream back (with num_workers=0 the caller is the training loop).
        generator = torch.default_generator
        saved_state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.transform(image)
        finally:
            generator.set_state(saved_state)

    def bad_files(self) -> list[Path]:
        """Files found unreadable so far, by this process or its loader workers."""
        return [self.root / self.relative_path(i) for i in self._known_bad.nonzero().flatten().tolist()]


class Batch(NamedTuple):
    """A batch: ``images`` (N, 3, H, W) and how many samples were unreadable.

    Training batches (``collate_skip_bad``) drop those samples: N is below the loader's batch
    size when samples were dropped, and 0 (``images`` of shape (0, 3, 0, 0)) in the unlikely case
    that every sample was bad; ``valid`` is None. Validation batches (``collate_masked``) keep
    their size, so that every process gathers tensors of one shape: an unreadable sample is a
    zero image whose entry in the boolean ``valid`` (N,) is False.
    """

    images: Tensor
    num_skipped: int
    valid: Tensor | None = None


def collate_skip_bad(samples: list[Tensor | None]) -> Batch:
    """Stack the readable samples (``None`` marks an unreadable one) into a ``Batch``."""
    images = [sample for sample in samples if sample is not None]
    num_skipped = len(samples) - len(images)
    if not images:
        return Batch(torch.empty(0, 3, 0, 0), num_skipped)
    return Batch(default_collate(images), num_skipped)  # in a worker, stacks straight into shared memory


def collate_masked(samples: list[Tensor | None], shape: tuple[int, ...]) -> Batch:
    """Stack every sample, a zero image of ``shape`` standing for an unreadable one (``None``),
    with the mask of the readable ones: a batch of the loader's size whatever was unreadable."""
    valid = torch.tensor([sample is not None for sample in samples])
    images = [torch.zeros(shape) if sample is None else sample for sample in samples]
    return Batch(default_collate(images), int((~valid).sum()), valid)


# ----------------------------------------------------------------------------------------------
# Transforms (on CxHxW tensors)
# ----------------------------------------------------------------------------------------------


class ReflectPadToSize:
    """Reflect-pad a CxHxW tensor that is smaller than ``size`` so that a ``size`` crop fits.

    Like torchvision's ``RandomCrop(pad_if_needed=True, padding_mode="reflect")``, a short side is
    padded by its shortfall on both ends; unlike it, the reflection repeats, so that images
    smaller than the padding (down to 1 pixel) work too.
    """

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Tensor) -> Tensor:
        height, width = image.shape[-2:]
        if height < self.size:
            image = image.index_select(-2, _reflected_indices(height, self.size - height))
        if width < self.size:
            image = image.index_select(-1, _reflected_indices(width, self.size - width))
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def _reflected_indices(length: int, pad: int) -> Tensor:
    """Source indices of a length-``length`` axis reflect-padded by ``pad`` on each end."""
    positions = torch.arange(-pad, length + pad)
    if length == 1:
        return torch.zeros_like(positions)
    period = 2 * (length - 1)
    positions = positions.remainder(period)
    return torch.where(positions >= length, period - positions, positions)


def train_transform(crop_size: int, mode: str = "random_crop") -> v2.Compose:
    """Training augmentation: a ``crop_size`` square crop, then a random horizontal flip.

    ``mode``: "random_crop" (a crop at a random position; images smaller than the crop are
    reflect-padded), "random_resized_crop" (a random 8-100 % area, aspect 3/4-4/3, resized to the
    crop), or "either" (one of the two at random per image, as the official MS-ILLM training).
    """
    if mode not in CROP_MODES:
        raise ConfigError(f"unknown crop mode {mode!r}: expected one of {', '.join(CROP_MODES)}")
    random_crop = v2.Compose([ReflectPadToSize(crop_size), v2.RandomCrop(crop_size)])
    random_resized_crop = v2.RandomResizedCrop(crop_size, antialias=True)
    crop = {
        "random_crop": random_crop,
        "random_resized_crop": random_resized_crop,
        "either": v2.RandomChoice([random_crop, random_resized_crop]),
    }[mode]
    return v2.Compose([crop, v2.RandomHorizontalFlip()])


def val_transform(crop_size: int, mode: str = "official_resize") -> v2.Compose:
    """Evaluation preprocessing to ``crop_size`` x ``crop_size``.

    ``mode``: "official_resize" resizes the whole image to the square, aspect ratio not kept (the
    official ``image_size: [256, 256]`` is a two-element ``Resize``, after which its centre crop
    does nothing); "resize_short_side_crop" resizes the shorter side, then crops the centre.
    """
    if mode not in VAL_TRANSFORMS:
        raise ConfigError(
            f"unknown validation transform {mode!r}: expected one of {', '.join(VAL_TRANSFORMS)}"
        )
    if mode == "official_resize":
        return v2.Compose([v2.Resize((crop_size, crop_size), antialias=True)])
    return v2.Compose([v2.Resize(crop_size, antialias=True), v2.CenterCrop(crop_size)])


# ----------------------------------------------------------------------------------------------
# Datasets of a run
# ----------------------------------------------------------------------------------------------


def train_dataset(data) -> ImageFolder:
    if not data.train:
        raise IllmError("data.train is empty: give a folder of training images (data.train=/path/to/images)")
    images = image_list(data.train, data.train_list, "data.train_list") if data.train_list else None
    if data.exclude_official_invalid:
        images = without_official_invalid(find_images(data.train) if images is None else images)
        if not images:
            raise ConfigError(f"data.exclude_official_invalid: no training image of {data.train} is left")
    return ImageFolder(data.train, train_transform(data.crop_size, data.crop_mode), images=images)


def val_dataset(data) -> ImageFolder | None:
    if not data.val:
        return None
    images = image_list(data.val, data.val_list, "data.val_list") if data.val_list else None
    dataset = ImageFolder(data.val, val_transform(data.val_crop_size, data.val_transform), images=images)
    if data.val_max_images and len(dataset) > data.val_max_images:
        dataset = torch.utils.data.Subset(dataset, range(data.val_max_images))
    return dataset


def image_list(root: str | os.PathLike, list_path: str | os.PathLike, key: str) -> list[str]:
    """The images a list file names, as paths relative to ``root``, in the file's order.

    One name per line, relative to ``root``; blank lines and lines starting with "#" are skipped.
    A name without an image extension gets ".jpg", as the official OpenImages lists are read
    (``neuralcompression/data/_openimages_v6.py``: the name's extension is dropped and ".jpg"
    added). Every listed file must be among the images of ``root`` (its cached index).
    """
    list_path = Path(list_path).expanduser()
    try:
        lines = list_path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"{key}: list file {list_path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{key}: cannot read list file {list_path}: {one_line(error)}") from None
    available = set(find_images(root))
    images, seen = [], set()
    for number, line in enumerate(lines, start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            name += ".jpg"
        name = os.path.normpath(name)
        if name not in available:
            raise ConfigError(f"{key}: {list_path} line {number}: no image {name} in {root}")
        if name in seen:
            raise ConfigError(f"{key}: {list_path} line {number}: {name} is listed twice")
        seen.add(name)
        images.append(name)
    if not images:
        raise ConfigError(f"{key}: list file {list_path} names no image")
    return images


def official_invalid_names() -> frozenset[str]:
    """The 100 training images the official OpenImages V6 dataset skips (names without extension)."""
    lines = (Path(__file__).parent / "resources" / OFFICIAL_INVALID_FILE).read_text().splitlines()
    return frozenset(line for line in lines if line and not line.startswith("#"))


def without_official_invalid(images: list[str]) -> list[str]:
    """``images`` (paths) less those whose file name, extension dropped, is officially invalid."""
    invalid = official_invalid_names()
    return [path for path in images if os.path.splitext(os.path.basename(path))[0] not in invalid]


def _base_dataset(dataset) -> ImageFolder:
    return dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset


def fixed_images(dataset, count: int, crop_size: int, mode: str = "official_resize") -> torch.Tensor | None:
    """The first `count` readable images of a dataset under the validation transform (for grids)."""
    if dataset is None or count == 0:
        return None
    base = _base_dataset(dataset)
    first = [base.relative_path(i) for i in range(min(len(base), count * 2))]
    plain = ImageFolder(base.root, val_transform(crop_size, mode), images=first)
    images = [img for i in range(len(plain)) if (img := plain[i]) is not None][:count]
    return torch.stack(images) if images else None


def fixed_image_sets(cfg, train_set, val_set) -> dict[str, Tensor | None]:
    """The fixed training and validation images every stage shows in its TensorBoard grids."""
    count, size, mode = cfg.logging.num_images, cfg.data.val_crop_size, cfg.data.val_transform
    return {
        "train": fixed_images(train_set, count, size, mode),
        "val": fixed_images(val_set, count, size, mode),
    }


# ----------------------------------------------------------------------------------------------
# Loader
# ----------------------------------------------------------------------------------------------


class SampleIndex(int):
    """A dataset index that also carries the seed of this sample's random augmentation.

    It is an ``int``, so any map-style dataset (or ``Subset``) takes it as a plain index;
    ``ImageFolder`` also reads ``seed``.
    """

    def __new__(cls, index: int, seed: int):
        sample = super().__new__(cls, index)
        sample.seed = seed
        return sample

    def __reduce__(self):  # travels to loader workers by pickling
        return SampleIndex, (int(self), self.seed)

    def __repr__(self) -> str:
        return f"SampleIndex({int(self)}, seed={self.seed})"


class EpochSampler(Sampler[SampleIndex]):
    """Every index once per epoch, each with its augmentation seed; all a function of (seed, epoch).

    With ``shuffle`` the order is a random permutation, else 0, 1, 2... Resuming needs no sampler
    state: ``set_epoch(epoch)`` recreates the epoch, and the first batches are skipped
    (``accelerate.skip_first_batches``) without being loaded.
    """

    def __init__(self, size: int, shuffle: bool, seed: int):
        if seed < 0:
            raise ConfigError(f"data seed must be >= 0, got {seed}")
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch`` for the next iteration."""
        self.epoch = epoch

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
        sample_seeds = rng.integers(0, 2**63, self.size)
        for index, sample_seed in zip(order, sample_seeds):
            yield SampleIndex(int(index), int(sample_seed))

    def __len__(self) -> int:
        return self.size


def _seed_worker(worker_id: int) -> None:
    """Seed a loader worker's torch/numpy/random streams, distinct per worker and per process.

    Only randomness that does not come from a ``SampleIndex`` seed uses these streams. Torch's
    own worker seed is (loader base seed + worker id), and every distributed process builds its
    loader with the same seed, so without the rank all processes would draw the same numbers.
    """
    rank = int(os.environ.get("RANK", "0"))
    seed = int(np.random.SeedSequence([torch.initial_seed(), rank]).generate_state(1, np.uint64)[0])
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    fill_shape: tuple[int, ...] | None = None,
) -> DataLoader:
    """A DataLoader of ``Batch``es over a dataset whose unreadable samples are ``None``.

    Unreadable samples are dropped (``collate_skip_bad``), or, given the ``fill_shape`` of every
    sample (validation), masked (``collate_masked``).

    Order and augmentation follow ``EpochSampler``: call ``set_epoch(epoch)`` on the loader
    Accelerate prepared (or on ``loader.sampler`` for a plain loader) before each epoch. Workers
    persist across epochs; memory is pinned when CUDA is available.
    """
    if drop_last and len(dataset) < batch_size:
        raise ConfigError(
            f"batch_size {batch_size} is larger than the dataset ({len(dataset)} images) with "
            "drop_last: an epoch would have no batches"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), shuffle=shuffle, seed=seed),
        num_workers=num_workers,
        collate_fn=collate_skip_bad if fill_shape is None else partial(collate_masked, shape=fill_shape),
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


# ----------------------------------------------------------------------------------------------
# Batch streams
# ----------------------------------------------------------------------------------------------


class BatchStream:
    """Endless batches over epochs that remembers its position, so a resumed run sees the same data.

    The shuffle order is a function of (seed, epoch); on resume the first `batches_done`
    batches of the current epoch are skipped without being loaded.
    """

    def __init__(self, loader, accelerator):
        self.loader = loader
        self.accelerator = accelerator
        self.epoch = 0
        self.batches_done = 0
        self.skipped_images = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "skipped_images": self.skipped_images}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]
        self.skipped_images = state.get("skipped_images", 0)

    def __iter__(self):
        previous = None
        while True:
            self.loader.set_epoch(self.epoch)
            batches = self.loader
            if self.batches_done:
                batches = self.accelerator.skip_first_batches(self.loader, self.batches_done)
            for batch in batches:
                self.batches_done += 1
                self.skipped_images += batch.num_skipped
                if batch.images.shape[0] == 0:
                    # Every image of this batch was unreadable: repeat the last batch rather than
                    # skip the step, so all processes keep stepping together under DDP.
                    if previous is None:
                        continue
                    yield previous
                    continue
                previous = batch.images
                yield batch.images
            self.epoch += 1
            self.batches_done = 0


class TrainingData:
    """A stage's data, folder -> dataset -> loader -> micro-batches.

    The datasets are built (and bad folders refused) before any process group exists; `prepare`
    then shards the loaders over the processes and opens the resumable training stream.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.train_set, self.val_set = train_dataset(cfg.data), val_dataset(cfg.data)
        self.fixed = fixed_image_sets(cfg, self.train_set, self.val_set)
        self.val_loader = None

    def prepare(self, accelerator) -> None:
        data, seed = self.cfg.data, self.cfg.run.seed
        self.accumulation = accumulation_steps(data, accelerator.num_processes)
        self.images_per_step = data.batch_size * self.accumulation * accelerator.num_processes
        train_loader = make_loader(
            self.train_set,
            data.batch_size,
            shuffle=True,
            num_workers=data.num_workers,
            seed=seed,
            drop_last=True,
        )
        self.stream = BatchStream(accelerator.prepare_data_loader(train_loader), accelerator)
        if self.val_set is not None:
            val_loader = make_loader(
                self.val_set,
                data.val_batch_size,
                num_workers=data.num_workers,
                fill_shape=(
                    3,
                    data.val_crop_size,
                    data.val_crop_size,
                ),  # unreadable images masked, not dropped
            )
            self.val_loader = accelerator.prepare_data_loader(val_loader)
        self._batches = None

    def next_micro_batches(self) -> list[Tensor]:
        """The micro-batches of the next iteration (the stream starts where a resume left it)."""
        if self._batches is None:
            self._batches = iter(self.stream)
        return [next(self._batches) for _ in range(self.accumulation)]
