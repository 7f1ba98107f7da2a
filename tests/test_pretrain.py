"""Stage 1 on the tiny config and generated images: logs, learning, resume, errors, bad files, DDP."""

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers.launch import DDP_TRAIN, launch_two_processes
from helpers.paths import TINY_CONFIGS
from helpers.synthetic import synthetic_images
from illm.checkpoint import read_checkpoint
from illm.config import load_config
from illm.errors import ConfigError
from illm.experiment import DataSection, PretrainConfig
from illm.loop import accumulation_steps
from illm.losses import build_distortion
from illm.stages.pretrain import build_autoencoder, build_parts, cli, pretrain_iteration, train

TINY = TINY_CONFIGS / "pretrain.toml"


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
    train(
        tiny(
            tmp_path / "run",
            folders,
            "train.max_steps=4",
            "logging.every=2",
            "logging.val_every=4",
            "checkpoint.every=4",
        )
    )
    events = scalars(tmp_path / "run")
    tags = set(events.Tags()["scalars"])
    expected = [
        "train/total_loss", "train/noisy_total_bpp", "train/quantized_total_bpp", "train/target", "train/lam2",
        "train/quantile_loss", "train/psnr", "train/mse", "optim/lr", "optim/grad_norm",
        "perf/images_per_second", "val/psnr", "val/ms_ssim", "val/lpips",
    ]  # fmt: skip
    for tag in expected:
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("train/total_loss")] == [2, 4]
    assert {"train/input_vs_reconstruction", "val/input_vs_reconstruction"} <= set(events.Tags()["images"])
    assert (tmp_path / "run" / "config.toml").exists()
    checkpoint = read_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000004.pt")
    assert checkpoint["step"] == 4 and "autoencoder" in checkpoint["models"]


def test_loss_falls_on_a_repeated_batch(tmp_path):
    synthetic_images(
        tmp_path / "one", 4, (64, 64), seed=3
    )  # crops of the full image: the same batch each step
    cfg = load_config(
        PretrainConfig,
        TINY,
        [
            f"run.dir={tmp_path / 'run'}",
            f"data.train={tmp_path / 'one'}",
            "data.val=''",
            "train.max_steps=30",
            "logging.every=1",
            "optim.warmup_steps=1",
            "checkpoint.every=30",
            "rate.lam_above=0.0",
            "rate.lam_below=0.0",
        ],
    )
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
    logged = [e.step for e in scalars(tmp_path / "stopped").Scalars("train/total_loss")]
    assert sorted(set(logged)) == [1, 2, 3, 4, 5, 6]


def test_other_experiment_in_the_same_folder_is_refused(tmp_path, folders):
    train(tiny(tmp_path / "run", folders, "train.max_steps=1", "checkpoint.every=1", "data.val=''"))
    from illm.errors import IllmError

    with pytest.raises(IllmError, match="another experiment"):
        train(tiny(tmp_path / "run", folders, "train.max_steps=2", "optim.weight_decay=0.01", "data.val=''"))
    train(
        tiny(
            tmp_path / "run",
            folders,
            "train.max_steps=2",
            "optim.weight_decay=0.01",
            "run.overwrite=true",
            "data.val=''",
        )
    )
    assert list(tmp_path.glob("run.replaced-*/checkpoints/step_00000001.pt"))  # moved aside, not deleted


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=0.1", "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
        ("optim.lr=-1", "key 'optim.lr': must be > 0"),
        ("data.crop_size=100", "multiple of 64"),
    ],
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
    train(
        load_config(
            PretrainConfig,
            TINY,
            [
                f"run.dir={tmp_path / 'run'}",
                f"data.train={data}",
                "data.val=''",
                "data.batch_size=6",
                "train.max_steps=2",
                "logging.every=1",
            ],
        )
    )
    skipped = scalars(tmp_path / "run").Scalars("data/skipped_images")
    assert skipped[-1].value >= 1


@pytest.mark.slow
def test_two_processes_keep_identical_parameters(tmp_path, folders):
    overrides = [
        f"run.dir={tmp_path / 'run'}",
        f"data.train={folders / 'train'}",
        f"data.val={folders / 'val'}",
        "train.max_steps=3",
        "data.batch_size=2",
        "logging.val_every=3",
        "checkpoint.every=3",
    ]
    out = launch_two_processes(DDP_TRAIN, "pretrain", str(tmp_path), str(TINY), *overrides)
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    for name, tensor in ranks[0]["params"].items():
        assert torch.equal(tensor, ranks[1]["params"][name]), name
    assert "processes: 2" in out


# --- the iteration function and the global batch -------------------------------------------------------


def iteration_parts(cfg, accelerator):
    return build_parts(
        cfg, accelerator, build_autoencoder(cfg.model).train(), build_distortion(cfg.distortion, None)
    )


def test_grad_norm_is_logged_after_unscaling(tmp_path, folders):
    """Under fp16 loss scaling the logged norm is that of the true gradients, not the scaled ones."""
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision="fp16", cpu=True)
    # On a CPU Accelerate runs fp16 without a loss scaler: install the one it uses on a GPU
    # (a small scale: the tiny model's fp16 gradients must stay finite for the step to happen).
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    accelerator.native_amp = True
    cfg = tiny(tmp_path / "run", folders, "train.grad_clip=0")
    torch.manual_seed(0)
    parts = iteration_parts(cfg, accelerator)
    seen = []
    parts.optimizer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append(
            torch.stack([p.grad.norm() for p in opt.param_groups[0]["params"] if p.grad is not None]).norm()
        )
    )
    result = pretrain_iteration(parts, [torch.rand(2, 3, 64, 64)], 0)
    assert len(seen) == 1 and parts.optimizer.optimizer.state  # the scaled step really stepped
    assert float(result.logs["optim/grad_norm"]) == pytest.approx(float(seen[0]), rel=1e-5)


def test_accumulated_micro_batches_equal_one_big_batch(tmp_path, folders):
    """Two micro-batches of 2 give the update of one batch of 4 (the global batch is the recipe)."""
    images = torch.rand(4, 3, 64, 64)
    cfg = tiny(tmp_path / "run", folders, "rate.lam_above=0", "rate.lam_below=0")  # noise-free loss
    updated = []
    for batches in ([images], [images[:2], images[2:]]):
        AcceleratorState._reset_state()
        torch.manual_seed(0)
        parts = iteration_parts(cfg, Accelerator(cpu=True))
        pretrain_iteration(parts, batches, 0)
        updated.append(parts.model.decoder.blocks[-1].weight.detach().clone())
    assert torch.allclose(updated[0], updated[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    ("global_batch", "batch", "processes", "expected"),
    [(16, 8, 1, 2), (16, 8, 2, 1), (16, 2, 8, 1), (16, 4, 1, 4), (0, 8, 3, 1), (32, 16, 2, 1)],
)
def test_accumulation_steps_follow_the_global_batch(global_batch, batch, processes, expected):
    data = DataSection(batch_size=batch, global_batch_size=global_batch)
    assert accumulation_steps(data, processes) == expected


@pytest.mark.parametrize(
    ("global_batch", "batch", "processes", "hint"),
    [(16, 8, 8, "divides 2"), (16, 8, 3, "not divisible by 3")],
)
def test_impossible_global_batch_is_a_one_line_error(global_batch, batch, processes, hint):
    with pytest.raises(ConfigError, match="data.global_batch_size") as error:
        accumulation_steps(DataSection(batch_size=batch, global_batch_size=global_batch), processes)
    assert hint in str(error.value) and "\n" not in str(error.value)
