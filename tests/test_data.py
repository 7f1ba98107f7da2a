import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.synthetic import synthetic_images
from illm.data import (
    Batch,
    EpochSampler,
    ImageFolder,
    ReflectPadToSize,
    SampleIndex,
    make_loader,
    train_transform,
    val_transform,
)
from illm.errors import ConfigError, IllmError
from illm.image_index import find_images


def touch(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def age_folders(root: Path, seconds: float = 60.0) -> None:
    """Backdate every folder's mtime: the index is only trusted for folders not changed just now."""
    past_ns = time.time_ns() - int(seconds * 1e9)
    for folder, subfolders, _ in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        os.utime(folder, ns=(past_ns, past_ns))


def forbid_listing(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the folder was listed although a valid index exists")

    monkeypatch.setattr(os, "scandir", fail)


@pytest.fixture
def home_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "xdg_cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


# --- find_images ------------------------------------------------------------------------------


def test_find_images_recurses_and_filters_extensions(tmp_path, home_cache):
    root = tmp_path / "images"
    for name in [
        "b.JPEG",
        "a.jpg",
        "c.png",
        "d.WebP",
        "e.txt",
        "f.gif",
        "g.jpg.bak",
        "sub/x.Jpg",
        "sub/deeper/y.png",
        ".hidden.jpg",
        ".cache/z.jpg",
        "sub/notes.md",
    ]:
        touch(root / name)
    (root / "folder.jpg").mkdir()  # a folder with an image-like name is not an image

    assert find_images(root) == ["a.jpg", "b.JPEG", "c.png", "d.WebP", "sub/deeper/y.png", "sub/x.Jpg"]


def test_find_images_reuses_its_index_until_a_folder_changes(tmp_path, home_cache, monkeypatch):
    root = tmp_path / "images"
    for name in ["0.jpg", "train_0/1.jpg", "train_0/2.jpg", "train_1/3.jpg"]:
        touch(root / name)
    expected = ["0.jpg", "train_0/1.jpg", "train_0/2.jpg", "train_1/3.jpg"]
    assert find_images(root) == expected  # creates <root>/.illm, so root has changed just now
    age_folders(root)
    assert find_images(root) == expected
    assert (root / ".illm" / "image_index.txt").is_file()

    with monkeypatch.context() as patch:
        forbid_listing(patch)
        assert find_images(root) == expected

    touch(root / "train_1" / "4.png")  # changes train_1's mtime only
    assert find_images(root) == [*expected, "train_1/4.png"]
    touch(root / "5.webp")
    (root / "0.jpg").unlink()
    assert find_images(root) == ["5.webp", "train_0/1.jpg", "train_0/2.jpg", "train_1/3.jpg", "train_1/4.png"]


def test_find_images_does_not_cache_folders_changed_just_before_the_scan(tmp_path, home_cache, monkeypatch):
    root = tmp_path / "images"
    touch(root / "a.jpg")
    (root / ".illm").mkdir()
    # A folder stamped after the scan started counts as changed within the timestamp margin,
    # whatever the clock reads when the scan runs.
    future_ns = time.time_ns() + 3600 * 10**9
    os.utime(root, ns=(future_ns, future_ns))
    assert find_images(root) == ["a.jpg"]
    assert not (root / ".illm" / "image_index.txt").exists() and not home_cache.exists()

    def denied(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(IllmError, match=f"cannot list image folder {root}"):
        find_images(root)


def test_find_images_ignores_a_damaged_index(tmp_path, home_cache, monkeypatch):
    root = tmp_path / "images"
    touch(root / "a.jpg")
    touch(root / "b.jpg")
    find_images(root)
    age_folders(root)
    find_images(root)
    index = root / ".illm" / "image_index.txt"
    index.write_text(index.read_text()[:-5])  # as if cut short
    assert find_images(root) == ["a.jpg", "b.jpg"]
    with monkeypatch.context() as patch:  # and the rescan wrote a complete one again
        forbid_listing(patch)
        assert find_images(root) == ["a.jpg", "b.jpg"]


def test_find_images_caches_in_home_when_the_folder_is_not_writable(tmp_path, home_cache, monkeypatch):
    root = tmp_path / "images"
    touch(root / "a.png")
    touch(root / ".illm")  # a file where the index folder would go: the index cannot be written there
    age_folders(root)

    assert find_images(root) == ["a.png"]
    assert len(list((home_cache / "illm").glob("image_index-*.txt"))) == 1
    with monkeypatch.context() as patch:
        forbid_listing(patch)
        assert find_images(root) == ["a.png"]


@pytest.mark.parametrize("make", ["missing", "empty", "no_images", "file"])
def test_find_images_errors_name_the_folder(tmp_path, home_cache, make):
    root = tmp_path / "images"
    if make == "empty":
        root.mkdir()
    elif make == "no_images":
        touch(root / "readme.txt")
    elif make == "file":
        touch(root)
    with pytest.raises(IllmError) as error:
        find_images(root)
    message = str(error.value)
    assert str(root) in message and "\n" not in message
    if make in ("empty", "no_images"):
        assert not (root / ".illm").exists()  # no litter in a folder that is not a dataset


# --- decoding and the dataset ----------------------------------------------------------------


def save(image: Image.Image, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def test_image_modes_load_as_rgb_floats(tmp_path, home_cache):
    root = tmp_path / "images"
    gray16 = np.array([[0, 32768, 65535]], dtype=np.uint16).repeat(2, axis=0)
    save(Image.fromarray(gray16), root / "a_gray16.png")
    save(Image.fromarray(np.array([[0, 128, 255]], dtype=np.uint8).repeat(2, axis=0)), root / "b_gray.png")
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 7
    save(Image.fromarray(rgba, "RGBA"), root / "c_rgba.png")
    save(Image.new("CMYK", (3, 2), (0, 255, 255, 0)), root / "d_cmyk.jpg", quality=100)
    save(Image.new("RGB", (3, 2), (255, 0, 0)), root / "e.webp", lossless=True)

    images = ImageFolder(root)
    assert len(images) == 5
    for index in range(len(images)):
        image = images[index]
        assert image.dtype == torch.float32 and image.shape == (3, 2, 3)
        assert 0 <= image.min() and image.max() <= 1
    expected_row = torch.tensor([0.0, 32768 / 65535, 1.0])
    torch.testing.assert_close(images[0], expected_row.expand(3, 2, 3))  # 16 bits kept, not clipped
    torch.testing.assert_close(images[1], (torch.tensor([0.0, 128.0, 255.0]) / 255).expand(3, 2, 3))
    for red_index in (2, 3, 4):  # RGBA: alpha dropped; CMYK (0, 1, 1, 0) is red
        red, green, blue = images[red_index].mean(dim=(1, 2))
        assert red > 0.9 and green < 0.1 and blue < 0.1


def test_dataset_paths_keep_non_ascii_names(tmp_path, home_cache):
    root = tmp_path / "images"
    names = ["a.png", "z.png", "été/ñandú.png"]  # sorted by code point
    for index, name in enumerate(names):
        save(Image.new("RGB", (4, 3), (index * 100, 0, 0)), root / name)
    dataset = ImageFolder(root)
    assert [dataset.relative_path(i) for i in range(len(dataset))] == names
    assert dataset[2][0, 0, 0].item() == pytest.approx(200 / 255)


def corrupt_folder(root: Path) -> tuple[Path, Path]:
    synthetic_images(root, 6, size=(24, 20), seed=1)
    garbage = touch(root / "garbage.jpg", b"this is not a jpeg" * 20)
    good_png = (root / "synthetic_00000.png").read_bytes()
    truncated = touch(root / "truncated.png", good_png[: len(good_png) // 2])
    return garbage, truncated


@pytest.mark.parametrize("num_workers", [0, 2])
def test_unreadable_files_are_skipped_and_counted(tmp_path, home_cache, num_workers):
    root = tmp_path / "images"
    garbage, truncated = corrupt_folder(root)
    dataset = ImageFolder(root, train_transform(16))
    loader = make_loader(dataset, batch_size=3, shuffle=True, num_workers=num_workers, seed=0)

    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert all(isinstance(batch, Batch) for batch in batches)
        assert sum(batch.num_skipped for batch in batches) == 2
        images = torch.cat([batch.images for batch in batches])
        assert images.shape == (6, 3, 16, 16) and images.dtype == torch.float32
        assert 0 <= images.min() and images.max() <= 1
    assert sorted(dataset.bad_files()) == sorted([garbage, truncated])  # seen from the main process


def test_unreadable_file_is_logged_once(tmp_path, home_cache, caplog):
    root = tmp_path / "images"
    garbage, truncated = corrupt_folder(root)
    dataset = ImageFolder(root, val_transform(16))
    loader = make_loader(dataset, batch_size=4, shuffle=True)
    with caplog.at_level(logging.WARNING, logger="illm.data"):
        for epoch in range(3):
            loader.sampler.set_epoch(epoch)
            assert sum(batch.num_skipped for batch in loader) == 2
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2
    assert any(str(garbage) in w for w in warnings) and any(str(truncated) in w for w in warnings)


def test_batch_of_only_unreadable_files_is_empty(tmp_path, home_cache):
    root = tmp_path / "images"
    touch(root / "a.jpg", b"junk")
    touch(root / "b.png", b"junk")
    (batch,) = list(make_loader(ImageFolder(root), batch_size=2))
    assert batch.images.shape[0] == 0 and batch.num_skipped == 2


def test_oversized_image_is_skipped(tmp_path, home_cache):
    root = tmp_path / "images"
    synthetic_images(root, 1, size=(20, 30))
    dataset = ImageFolder(root, max_pixels=20 * 30 - 1)
    assert dataset[0] is None and len(dataset.bad_files()) == 1


# --- transforms -------------------------------------------------------------------------------


def test_reflect_padding_matches_numpy_and_handles_tiny_images():
    image = torch.arange(3 * 5 * 3).reshape(3, 5, 3)
    padded = ReflectPadToSize(9)(image)
    # torchvision's pad_if_needed pads the shortfall on both ends: 5 -> 5 + 2*4, 3 -> 3 + 2*6
    expected = np.pad(image.numpy(), ((0, 0), (4, 4), (6, 6)), mode="reflect")
    assert np.array_equal(padded.numpy(), expected)
    assert ReflectPadToSize(4)(torch.full((3, 1, 1), 7)).eq(7).all()
    big = torch.zeros(3, 12, 10)
    assert ReflectPadToSize(8)(big) is big


@pytest.mark.parametrize("mode", ["random_crop", "random_resized_crop", "either"])
@pytest.mark.parametrize("height, width", [(1, 1), (5, 3), (40, 70)])
def test_train_transform_always_gives_the_crop_size(mode, height, width):
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
    for _ in range(4):
        out = train_transform(32, mode)(image)
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8


def test_random_crop_of_a_small_image_is_padded_by_reflection():
    image = torch.arange(4 * 6, dtype=torch.uint8).reshape(1, 4, 6).expand(3, 4, 6)
    out = train_transform(8, "random_crop")(image)
    assert out.shape == (3, 8, 8)
    assert set(out.unique().tolist()) <= set(range(24))  # only image values: no constant fill


def test_train_transform_rejects_unknown_mode():
    with pytest.raises(ConfigError, match="random_cropp"):
        train_transform(32, "random_cropp")


def test_val_transform_resizes_the_shorter_side_and_centre_crops():
    left_dark = torch.zeros(3, 64, 128, dtype=torch.uint8)
    left_dark[..., 64:] = 255
    transform = val_transform(32, "resize_short_side_crop")
    out = transform(left_dark)  # resized to 32x64, then columns 16..47 kept
    assert out.shape == (3, 32, 32)
    assert out[..., :14].max() == 0 and out[..., 18:].min() == 255
    assert transform(torch.zeros(3, 10, 7, dtype=torch.uint8)).shape == (3, 32, 32)


# --- ordering and resumption --------------------------------------------------------------


class Indices(torch.utils.data.Dataset):
    def __len__(self):
        return 24

    def __getitem__(self, index):
        return torch.tensor(index)


def epoch_order(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return torch.cat([batch.images for batch in loader]).tolist()


def test_shuffle_order_is_a_function_of_seed_and_epoch():
    loader = make_loader(Indices(), batch_size=5, shuffle=True, seed=7)
    again = make_loader(Indices(), batch_size=5, shuffle=True, seed=7)
    assert sorted(epoch_order(loader, 0)) == list(range(24))
    assert epoch_order(loader, 0) == epoch_order(again, 0)
    assert epoch_order(loader, 3) == epoch_order(again, 3)  # no hidden state from earlier epochs
    assert epoch_order(loader, 0) != epoch_order(loader, 1)
    assert epoch_order(loader, 0) != epoch_order(make_loader(Indices(), 5, shuffle=True, seed=8), 0)
    assert epoch_order(make_loader(Indices(), 5), 2) == list(range(24))


def test_resume_with_accelerate_skip_first_batches():
    from accelerate import skip_first_batches
    from accelerate.data_loader import prepare_data_loader

    shards = []
    for process_index in range(2):
        loader = prepare_data_loader(
            make_loader(Indices(), batch_size=3, shuffle=True, seed=5, drop_last=True),
            num_processes=2,
            process_index=process_index,
            put_on_device=False,
        )
        loader.set_epoch(4)
        full = [batch.images.tolist() for batch in loader]
        loader.set_epoch(4)
        resumed = [batch.images.tolist() for batch in skip_first_batches(loader, 2)]
        assert resumed == full[2:]
        shards.append(full)
    everything = sorted(i for shard in shards for batch in shard for i in batch)
    assert everything == list(range(24))
    plain = make_loader(Indices(), batch_size=3, shuffle=True, seed=5)
    assert shards[0][0] == epoch_order(plain, 4)[:3]  # process 0 starts the epoch's global order


def epoch_images(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return torch.cat([batch.images for batch in loader])


def test_augmentation_is_a_function_of_seed_and_epoch_not_of_workers(tmp_path, home_cache):
    synthetic_images(tmp_path / "images", 6, size=(40, 36), seed=2)
    dataset = ImageFolder(tmp_path / "images", train_transform(24, "either"))
    in_process = make_loader(dataset, batch_size=4, shuffle=True, seed=1)
    in_workers = make_loader(dataset, batch_size=4, shuffle=True, seed=1, num_workers=2)
    torch.manual_seed(123)  # the global RNG must not matter
    first = epoch_images(in_process, 0)
    torch.manual_seed(456)
    assert torch.equal(first, epoch_images(in_process, 0))
    assert torch.equal(first, epoch_images(in_workers, 0))
    assert not torch.equal(first, epoch_images(in_process, 1))


def test_seeded_sample_leaves_the_global_rng_alone(tmp_path, home_cache):
    synthetic_images(tmp_path / "images", 1, size=(40, 36))
    dataset = ImageFolder(tmp_path / "images", train_transform(24))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    first = dataset[SampleIndex(0, seed=5)]
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(dataset[SampleIndex(0, seed=5)], first)
    assert not torch.equal(dataset[SampleIndex(0, seed=6)], first)


def test_sampler_rejects_negative_seed():
    with pytest.raises(ConfigError, match="-1"):
        EpochSampler(10, shuffle=True, seed=-1)


def test_drop_last_with_too_few_images_is_a_config_error():
    with pytest.raises(ConfigError, match="batch_size 32"):
        make_loader(Indices(), batch_size=32, drop_last=True)


# --- synthetic images -------------------------------------------------------------------------


def test_synthetic_images_are_deterministic_and_smooth(tmp_path):
    first = synthetic_images(tmp_path / "a", 3, size=(48, 64), seed=3)
    second = synthetic_images(tmp_path / "b", 3, size=(48, 64), seed=3)
    other = synthetic_images(tmp_path / "c", 3, size=(48, 64), seed=4)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert first[0].read_bytes() != other[0].read_bytes()
    assert first[0].read_bytes() != first[1].read_bytes()
    for path in first:
        pixels = np.asarray(Image.open(path), dtype=np.float64) / 255
        assert pixels.shape == (48, 64, 3)
        neighbour_step = np.abs(np.diff(pixels, axis=1)).mean()
        assert neighbour_step < 0.05  # uniform noise would give ~0.33
        assert pixels.std() > 0.05  # not flat
