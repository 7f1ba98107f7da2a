"""Validation as the official run measures it: whole folder, official resize, pooled PSNR, FID
from gathered feature moments, masked batches; image lists and the official exclusion list."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torchvision.transforms.v2 import functional as TF

from helpers.launch import DDP_TRAIN, launch_two_processes
from helpers.paths import TINY_CONFIGS
from helpers.synthetic import synthetic_images
from illm import metrics
from illm.checkpoint import read_checkpoint
from illm.config import load_config
from illm.data import (
    ImageFolder,
    image_list,
    make_loader,
    official_invalid_names,
    train_dataset,
    val_transform,
)
from illm.errors import ConfigError
from illm.experiment import FinetuneConfig, PretrainConfig
from illm.logger import TensorBoardLogger
from illm.models.hific import HiFiCAutoencoder
from illm.stages import finetune, pretrain, vqvae
from illm.validation import SampleMeans, validate_autoencoder, validation_images

TINY_PRETRAIN = TINY_CONFIGS / "pretrain.toml"
TINY_FINETUNE = TINY_CONFIGS / "finetune.toml"
VAL_SIZE = 192  # the tiny configs' val_crop_size


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Training images, and a validation folder of 5 non-square photos (not a multiple of the
    batch of 4) plus one unreadable file."""
    root = tmp_path_factory.mktemp("validation_data")
    synthetic_images(root / "train", 8, (64, 80), seed=0)
    synthetic_images(root / "val", 5, (200, 240), seed=1)
    (root / "val" / "synthetic_00002_broken.png").write_bytes(b"not an image")
    return root


def official_validation(model: HiFiCAutoencoder, folder: Path) -> dict[str, float]:
    """Per-image MSE of every readable image of `folder`, resized to VAL_SIZE squared as the
    official transform does, computed here in one process without the project's loader."""
    images = []
    for path in sorted(folder.glob("*.png")):
        try:
            pixels = np.asarray(Image.open(path).convert("RGB"))
        except OSError:
            continue
        image = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
        images.append(TF.resize(image, [VAL_SIZE, VAL_SIZE], antialias=True).float() / 255)
    images = torch.stack(images)
    with torch.no_grad():
        recon = model.eval()(images).images.float().clamp(0, 1)
    mse = metrics.mse_255(recon, images)
    return {
        "count": len(images),
        "val/mse": mse.mean().item(),
        "val/psnr": metrics.psnr_of_mse(mse.mean()).item(),
        "val/psnr_per_image_mean": metrics.psnr_of_mse(mse).double().mean().item(),
    }


def final_metrics(run_dir: Path, step: int) -> dict:
    return read_checkpoint(run_dir / "checkpoints" / f"step_{step:08d}.pt")["metrics"]


def stage1_model(run_dir: Path, step: int) -> HiFiCAutoencoder:
    checkpoint = read_checkpoint(run_dir / "checkpoints" / f"step_{step:08d}.pt")
    cfg = load_config(PretrainConfig, TINY_PRETRAIN, [])
    model = pretrain.build_autoencoder(cfg.model)
    model.load_state_dict(checkpoint["models"]["autoencoder"])
    return model


def tiny_stage1_args(folders: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [
        f"run.dir={run_dir}",
        f"data.train={folders / 'train'}",
        f"data.val={folders / 'val'}",
        "train.max_steps=2",
        "logging.val_every=2",
        "checkpoint.every=2",
        *overrides,
    ]


OFFICIAL_SCALARS = ["val/psnr", "val/mse", "val/hific_distortion", "val/fid", "val/psnr_per_image_mean"]
OFFICIAL_LOSSES = [  # the official eval_step's other names
    "val/distortion_loss", "val/rate_loss", "val/total_bpp", "val/quantized_total_bpp", "val/hyper_bpp",
    "val/quantized_hyper_bpp", "val/latent_bpp", "val/quantized_latent_bpp", "val/target", "val/lam2",
]  # fmt: skip


# --- the whole folder, official transform, official scalars ------------------------------------------


def test_tiny_stage1_validates_the_whole_folder_as_the_official(tmp_path, folders):
    cfg = load_config(PretrainConfig, TINY_PRETRAIN, tiny_stage1_args(folders, tmp_path / "run"))
    assert cfg.data.val_max_images == 0 and cfg.data.val_transform == "official_resize"
    assert cfg.fid.backbone_weights == "random"
    pretrain.train(cfg)
    logged = final_metrics(tmp_path / "run", 2)
    for name in [*OFFICIAL_SCALARS, *OFFICIAL_LOSSES, "val/total_loss"]:
        assert np.isfinite(logged[name]), name
    assert logged["val/total_loss"] == pytest.approx(
        cfg.distortion.lam * logged["val/distortion_loss"] + logged["val/rate_loss"], rel=1e-6
    )
    expected = official_validation(stage1_model(tmp_path / "run", 2), folders / "val")
    assert expected["count"] == 5
    for name in ("val/mse", "val/psnr", "val/psnr_per_image_mean"):
        assert logged[name] == pytest.approx(expected[name], rel=1e-4), name
    assert logged["val/psnr"] != pytest.approx(logged["val/psnr_per_image_mean"], rel=1e-6)  # pooled
    assert logged["val/hific_distortion"] == pytest.approx(
        0.075 * 2**-5 * logged["val/mse"] + logged["val/lpips"], rel=1e-9
    )
    assert logged["val/fid"] > 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [event.value for event in events.Scalars("val/fid")] == [pytest.approx(logged["val/fid"])]


def test_short_side_transform_is_a_switch(tmp_path, folders):
    args = tiny_stage1_args(
        folders, tmp_path / "run", "data.val_transform=resize_short_side_crop", "fid.enabled=false"
    )
    pretrain.train(load_config(PretrainConfig, TINY_PRETRAIN, args))
    logged = final_metrics(tmp_path / "run", 2)
    expected = official_validation(stage1_model(tmp_path / "run", 2), folders / "val")
    assert "val/fid" not in logged
    assert logged["val/mse"] != pytest.approx(expected["val/mse"], rel=1e-4)  # another crop


def test_tiny_stage2_logs_the_official_scalars(tmp_path, folders):
    common = [f"data.train={folders / 'train'}", "data.val=", "train.max_steps=1", "checkpoint.every=1"]
    pretrain.main([str(TINY_PRETRAIN), *common, f"run.dir={tmp_path / 'stage1'}"])
    vqvae.main([str(TINY_CONFIGS / "vqvae.toml"), *common, f"run.dir={tmp_path / 'stage0'}"])
    args = [
        f"data.train={folders / 'train'}",
        f"data.val={folders / 'val'}",
        f"run.dir={tmp_path / 'stage2'}",
        f"init.autoencoder={tmp_path / 'stage1'}",
        f"init.labeller={tmp_path / 'stage0'}",
        "train.max_steps=1",
        "logging.val_every=1",
        "checkpoint.every=1",
    ]
    cfg = load_config(FinetuneConfig, TINY_FINETUNE, args)
    assert cfg.data.val_max_images == 0 and cfg.fid.backbone_weights == "random"
    networks = finetune.train(cfg)
    logged = final_metrics(tmp_path / "stage2", 1)
    for name in [*OFFICIAL_SCALARS, *OFFICIAL_LOSSES, "val/generator_loss", "val/total_model_loss"]:
        assert np.isfinite(logged[name]), name
    expected = official_validation(networks["autoencoder"], folders / "val")
    assert logged["val/psnr"] == pytest.approx(expected["val/psnr"], rel=1e-4)
    total = (
        cfg.distortion.lam * logged["val/distortion_loss"]
        + logged["val/rate_loss"]
        + cfg.gan.generator_weight * logged["val/generator_loss"]
    )
    assert logged["val/total_model_loss"] == pytest.approx(total, rel=1e-6)


@pytest.mark.slow
def test_two_processes_with_an_unreadable_file_match_one_process(tmp_path, folders):
    """Issue 18 point 8: 5 readable images + 1 unreadable, batches of 2 on 2 processes (uneven);
    every rank keeps its batch shape, and the logged metrics are the one-process ones."""
    args = tiny_stage1_args(folders, tmp_path / "run", "data.val_batch_size=2")
    launch_two_processes(DDP_TRAIN, "pretrain", str(tmp_path), str(TINY_PRETRAIN), *args)
    logged = final_metrics(tmp_path / "run", 2)
    expected = official_validation(stage1_model(tmp_path / "run", 2), folders / "val")
    for name in ("val/mse", "val/psnr", "val/psnr_per_image_mean"):
        assert logged[name] == pytest.approx(expected[name], rel=1e-4), name
    assert np.isfinite(logged["val/fid"])


# --- pieces ------------------------------------------------------------------------------------------


def test_official_resize_squashes_and_the_switch_crops():
    left_dark = torch.full((3, 20, 40), 200, dtype=torch.uint8)
    left_dark[:, :, :10] = 0  # the left quarter
    squashed = val_transform(32, "official_resize")(left_dark)
    cropped = val_transform(32, "resize_short_side_crop")(left_dark)
    assert squashed.shape == cropped.shape == (3, 32, 32)
    assert squashed[:, :, :6].max() < 50 and squashed[:, :, 10:].min() > 150  # whole width kept
    assert cropped[:, :, :2].float().mean() < cropped[:, :, 10:].float().mean()
    assert cropped[:, :, 6].min() > 150  # the dark quarter is mostly cropped away
    with pytest.raises(ConfigError, match="unknown validation transform 'nope'"):
        val_transform(32, "nope")


def test_masked_batches_keep_their_size(tmp_path, folders):
    dataset = ImageFolder(folders / "val", val_transform(64))
    loader = make_loader(dataset, batch_size=4, fill_shape=(3, 64, 64))
    batches = list(validation_images(loader))
    assert [images.shape[0] for images, _ in batches] == [4, 2]
    valid = torch.cat([v for _, v in batches])
    broken = [dataset.relative_path(i) for i in range(len(dataset))].index("synthetic_00002_broken.png")
    assert valid.tolist() == [i != broken for i in range(6)]
    assert torch.all(torch.cat([images for images, _ in batches])[broken] == 0)


class OneProcess:
    """What `SampleMeans` and `validate_autoencoder` need of an Accelerator, for one process on
    `device`."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)

    def gather_for_metrics(self, tensor):
        return tensor

    def unwrap_model(self, model):
        return model


def test_sample_means_count_only_valid_images():
    means = SampleMeans(OneProcess())
    valid = torch.tensor([True, False, True])
    means.add(
        {"a": torch.tensor([1.0, float("inf"), 3.0]), "b": torch.tensor([0.0, float("nan"), 4.0])}, valid
    )
    means.add(
        {"a": torch.tensor([5.0, 7.0, 9.0]), "b": torch.tensor([1.0, 1.0, 1.0])}, torch.zeros(3, dtype=bool)
    )
    assert means.means() == {"a": 2.0, "b": 2.0}


def test_feature_moments_give_the_fid_of_the_features():
    generator = torch.Generator().manual_seed(0)
    real, fake = torch.randn(40, 6, generator=generator), torch.randn(40, 6, generator=generator) * 2 + 1
    moments = metrics.FeatureMoments(), metrics.FeatureMoments()
    for chunk_real, chunk_fake in zip(real.split(7), fake.split(7)):
        moments[0].add(chunk_real)
        moments[1].add(chunk_fake)
    expected = metrics.frechet_distance(real, fake)
    assert metrics.frechet_distance_of_moments(*moments) == pytest.approx(expected, rel=1e-9)
    two = metrics.FeatureMoments()
    two.add(real[:2])
    assert np.isfinite(metrics.frechet_distance_of_moments(two, two))
    one = metrics.FeatureMoments()
    one.add(real[:1])
    with pytest.raises(ValueError, match="at least 2"):
        one.statistics()


class MetaAutoencoder(nn.Module):
    """Stands in for an autoencoder on an accelerator: its weights live on the "meta" device."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, device="meta"))

    def forward(self, images):
        return SimpleNamespace(images=images * self.scale)


def test_previews_are_on_the_reconstructions_device(tmp_path):
    """Issue 18 point 1: the fixed images go to the accelerator's device with the model."""
    pairs = []
    logger = TensorBoardLogger(tmp_path, enabled=False)  # a non-main process: nothing written
    original_image_pairs = logger.image_pairs

    def image_pairs(tag, originals, reconstructions, step):
        pairs.append((originals.device, reconstructions.device))
        original_image_pairs(tag, originals, reconstructions, step)

    logger.image_pairs = image_pairs
    run = SimpleNamespace(accelerator=OneProcess("meta"), logger=logger, config=None)
    fixed = {"train": torch.rand(2, 3, 8, 8), "val": torch.rand(2, 3, 8, 8)}
    validate_autoencoder(run, MetaAutoencoder(), [], None, None, None, 0, fixed)
    assert pairs == [(torch.device("meta"), torch.device("meta"))] * 2


def test_image_pairs_refuse_two_devices(tmp_path):
    logger = TensorBoardLogger(tmp_path, enabled=False)
    with pytest.raises(ValueError, match="originals on cpu, reconstructions on meta"):
        logger.image_pairs("val/x", torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4, device="meta"), 0)


# --- image lists -------------------------------------------------------------------------------------


def test_train_list_with_the_official_exclusion_trains_on_exactly_the_listed_files(tmp_path):
    folder = tmp_path / "train"
    synthetic_images(folder, 4, (64, 64), seed=0)
    invalid = sorted(official_invalid_names())[:2]
    for name in invalid:  # two officially invalid images, one of them in a subfolder
        synthetic_images(tmp_path / "tmp", 1, (64, 64), seed=5)[0].rename(folder / f"{name}.png")
    (folder / "sub").mkdir()
    (folder / f"{invalid[1]}.png").rename(folder / "sub" / f"{invalid[1]}.png")
    synthetic_images(folder / "sub", 1, (64, 64), seed=6)[0].rename(folder / "sub" / "extra.png")
    listed = [
        "synthetic_00003.png",
        f"{invalid[0]}.png",
        "sub/extra.png",
        f"sub/{invalid[1]}.png",
        "synthetic_00001.png",
    ]
    list_file = tmp_path / "list.txt"
    list_file.write_text("# the official list format\n" + "\n".join(listed) + "\n\n")
    cfg = load_config(PretrainConfig, TINY_PRETRAIN, [f"data.train={folder}", f"data.train_list={list_file}"])
    dataset = train_dataset(cfg.data)
    assert [dataset.relative_path(i) for i in range(len(dataset))] == listed
    cfg.data.exclude_official_invalid = True
    dataset = train_dataset(cfg.data)
    kept = ["synthetic_00003.png", "sub/extra.png", "synthetic_00001.png"]
    assert [dataset.relative_path(i) for i in range(len(dataset))] == kept
    # and a run trains on exactly those: every sampled index is one of them
    loader = make_loader(dataset, batch_size=3, shuffle=True, seed=1)
    assert sum(batch.images.shape[0] for batch in loader) == 3


def test_official_exclusion_list_ships_with_the_package():
    names = official_invalid_names()
    assert len(names) == 100 and "0a866d6fd1ea9317" in names and "f0508277b718aa55" in names


def test_name_without_extension_reads_the_jpeg(tmp_path):
    folder = tmp_path / "images"
    path = synthetic_images(folder, 1, (16, 16))[0]
    Image.open(path).convert("RGB").save(folder / "0001eeaf4aed83f9.jpg")
    (tmp_path / "list.txt").write_text("0001eeaf4aed83f9\n")
    assert image_list(folder, tmp_path / "list.txt", "data.train_list") == ["0001eeaf4aed83f9.jpg"]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"data.train_list: list file .*missing.txt does not exist"),
        ("synthetic_00000.png\nnope.png\n", r"data.train_list: .*list.txt line 2: no image nope.png in "),
        ("synthetic_00000.png\nsynthetic_00000.png\n", r"line 2: synthetic_00000.png is listed twice"),
        ("# nothing\n\n", r"names no image"),
    ],
)
def test_bad_lists_are_one_line_errors(tmp_path, content, message):
    folder = tmp_path / "images"
    synthetic_images(folder, 1, (16, 16))
    list_file = tmp_path / ("missing.txt" if content is None else "list.txt")
    if content is not None:
        list_file.write_text(content)
    with pytest.raises(ConfigError, match=message) as error:
        image_list(folder, list_file, "data.train_list")
    assert "\n" not in str(error.value)


def test_a_missing_list_stops_the_command_with_one_line(tmp_path, folders, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.cli(
            [
                str(TINY_PRETRAIN),
                f"data.train={folders / 'train'}",
                f"data.train_list={tmp_path / 'none.txt'}",
            ]
        )
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"pretrain.py: error: data.train_list: list file {tmp_path / 'none.txt'} does not exist"]
