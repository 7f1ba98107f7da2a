"""Stage 1 on the tiny config and generated images: logs, learning, resume, errors, bad files, DDP."""

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers.launch import DDP_TRAIN, launch_two_processes
from helpers.synthetic import synthetic_images
from illm.checkpoint import read_checkpoint
from illm.config import load_config
from illm.experiment import PretrainConfig
from illm.stages.pretrain import cli, train

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "illm" / "configs" / "tiny" / "pretrain.toml"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_data")
    synthetic_images(root / "train", 8, (80, 96), seed=0)
    synthetic_images(root / "val", 2, (192, 192), seed=1)
    return root


def tiny(run_dir, folders, *overrides):
    base = [f"run.dir={run_dir}", f"data.train={folders / 'train'}", f"data.val={folders / 'val'}"]
    return load_config(PretrainConfig, TINY, base + list(overrides))


def scalars(run_dir) -> EventAccumulator:
    events = EventAccumulator(str(Path(run_dir) / "tensorboard"))
    events.Reload()
    return events


def test_runs_end_to_end_and_logs(tmp_path, folders):
    train(tiny(tmp_path / "run", folders, "train.max_steps=4", "logging.every=2", "logging.val_every=4", "checkpoint.every=4"))
    events = scalars(tmp_path / "run")
    tags = set(events.Tags()["scalars"])
    for tag in ["train/loss", "train/bpp", "train/rounded_bpp", "rate/target_bpp", "optim/lr", "optim/grad_norm", "perf/images_per_second", "val/psnr", "val/ms_ssim", "val/lpips"]:
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
    assert {"train/input_vs_reconstruction", "val/input_vs_reconstruction"} <= set(events.Tags()["images"])
    assert (tmp_path / "run" / "config.toml").exists()
    checkpoint = read_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000004.pt")
    assert checkpoint["step"] == 4 and "autoencoder" in checkpoint["models"]


def test_loss_falls_on_a_repeated_batch(tmp_path):
    synthetic_images(tmp_path / "one", 4, (64, 64), seed=3)  # crops of the full image: the same batch each step
    cfg = load_config(PretrainConfig, TINY, [f"run.dir={tmp_path / 'run'}", f"data.train={tmp_path / 'one'}", "data.val=''", "train.max_steps=30", "logging.every=1", "optim.warmup_steps=1", "checkpoint.every=30", "rate.lam_above=0.0", "rate.lam_below=0.0"])
    train(cfg)
    losses = [e.value for e in scalars(tmp_path / "run").Scalars("train/distortion_loss")]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_resume_matches_an_uninterrupted_run(tmp_path, folders):
    steps = ["logging.every=1", "logging.val_every=100", "checkpoint.every=3", "data.val=''"]
    train(tiny(tmp_path / "straight", folders, "train.max_steps=6", *steps))
    train(tiny(tmp_path / "stopped", folders, "train.max_steps=3", *steps))
    train(tiny(tmp_path / "stopped", folders, "train.max_steps=6", *steps))  # same command, longer: resumes
    straight = read_checkpoint(tmp_path / "straight" / "checkpoints" / "step_00000006.pt")
    resumed = read_checkpoint(tmp_path / "stopped" / "checkpoints" / "step_00000006.pt")
    for name, tensor in straight["models"]["autoencoder"].items():
        assert torch.equal(tensor, resumed["models"]["autoencoder"][name]), name
    logged = [e.step for e in scalars(tmp_path / "stopped").Scalars("train/loss")]
    assert sorted(set(logged)) == [1, 2, 3, 4, 5, 6]


def test_other_experiment_in_the_same_folder_is_refused(tmp_path, folders):
    train(tiny(tmp_path / "run", folders, "train.max_steps=1", "checkpoint.every=1", "data.val=''"))
    from illm.errors import IllmError

    with pytest.raises(IllmError, match="another experiment"):
        train(tiny(tmp_path / "run", folders, "train.max_steps=2", "optim.lr=0.01", "data.val=''"))
    train(tiny(tmp_path / "run", folders, "train.max_steps=2", "optim.lr=0.01", "run.overwrite=true", "data.val=''"))
    assert list(tmp_path.glob("run.replaced-*/checkpoints/step_00000001.pt"))  # moved aside, not deleted


@pytest.mark.parametrize(
    "override, message",
    [("optim.lrr=0.1", "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"), ("optim.lr=-1", "key 'optim.lr': must be > 0"), ("data.crop_size=100", "multiple of 64")],
)
def test_config_errors_are_one_line(override, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli([str(TINY), override])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(TINY) in lines[0], err


def test_corrupt_image_is_skipped(tmp_path, folders):
    data = tmp_path / "data"
    synthetic_images(data, 5, (64, 64), seed=4)
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    train(load_config(PretrainConfig, TINY, [f"run.dir={tmp_path / 'run'}", f"data.train={data}", "data.val=''", "data.batch_size=6", "train.max_steps=2", "logging.every=1"]))
    skipped = scalars(tmp_path / "run").Scalars("data/skipped_images")
    assert skipped[-1].value >= 1


@pytest.mark.slow
def test_two_processes_keep_identical_parameters(tmp_path, folders):
    overrides = [f"run.dir={tmp_path / 'run'}", f"data.train={folders / 'train'}", f"data.val={folders / 'val'}", "train.max_steps=3", "data.batch_size=2", "logging.val_every=3", "checkpoint.every=3"]
    out = launch_two_processes(DDP_TRAIN, "pretrain", str(tmp_path), str(TINY), *overrides)
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    for name, tensor in ranks[0]["params"].items():
        assert torch.equal(tensor, ranks[1]["params"][name]), name
    assert "processes: 2" in out
