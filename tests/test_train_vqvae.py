"""Stage 0 on the tiny config and generated images: logs, learning, labels, re-seeding, resume, DDP."""

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers.launch import DDP_TRAIN, launch_two_processes
from helpers.paths import TINY_CONFIGS
from helpers.synthetic import synthetic_images
from illm import metrics, zoo
from illm.checkpoint import read_checkpoint
from illm.config import load_config
from illm.data import val_dataset
from illm.experiment import VQVAEConfig
from illm.stages.vqvae import build_vqvae, cli, train

TINY = TINY_CONFIGS / "vqvae.toml"
CODEBOOK = "bottleneck_op.child.child.codebooks.0"
# Small validation images keep most tests fast; the logging test uses the config's 192 (MS-SSIM).
FAST = ["data.val_crop_size=64", "data.val=''"]


@pytest.fixture(autouse=True)
def _one_thread():
    # The tiny model gains nothing from a second thread, and on shared cores two threads ran
    # the loop several times slower (threads waiting for each other).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqvae_data")
    synthetic_images(root / "train", 8, (80, 96), seed=0)
    synthetic_images(root / "val", 2, (192, 192), seed=1)
    return root


def tiny(run_dir, folders, *overrides):
    base = [f"run.dir={run_dir}", f"data.train={folders / 'train'}", f"data.val={folders / 'val'}"]
    return load_config(VQVAEConfig, TINY, base + list(overrides))


def events(run_dir) -> EventAccumulator:
    accumulator = EventAccumulator(str(Path(run_dir) / "tensorboard"))
    accumulator.Reload()
    return accumulator


@pytest.mark.slow  # a few seconds of stage-0 training
def test_runs_logs_and_gives_labels(tmp_path, folders):
    run = tmp_path / "run"
    train(
        tiny(
            run,
            folders,
            "train.max_steps=4",
            "data.global_batch_size=8",
            "logging.every=2",
            "logging.val_every=4",
            "checkpoint.every=4",
            "loss.lpips_weight=0.5",
        )
    )
    logged = events(run)
    tags = set(logged.Tags()["scalars"])
    expected = [
        "train/loss",
        "train/l1",
        "train/lpips",
        "train/commitment",
        "train/codebook",
        "codebook/perplexity",
        "codebook/used_fraction",
        "codebook/dead_codes",
        "codebook/stale_codes",
        "optim/lr",
        "optim/grad_norm",
        "perf/images_per_second",
        "val/psnr",
        "val/ms_ssim",
        "val/lpips",
        "val/l1",
        "val/codebook/perplexity",
        "val/codebook/used_fraction",
    ]
    for tag in expected:
        assert tag in tags, tag
    assert [e.step for e in logged.Scalars("train/loss")] == [2, 4]
    assert 1 <= logged.Scalars("codebook/perplexity")[-1].value <= 64
    assert {"train/input_vs_reconstruction", "val/input_vs_reconstruction", "val/input_vs_labels"} <= set(
        logged.Tags()["images"]
    )

    labeller = zoo.load(run, kind="vqvae")
    labels = labeller.labels(torch.rand(2, 3, 64, 96))
    assert labels.shape == (2, 8, 12) and labels.dtype == torch.int64
    assert 0 <= labels.min() and labels.max() < 64 == labeller.num_codes


@pytest.mark.slow  # a few seconds of stage-0 training
def test_loss_falls_on_a_repeated_batch(tmp_path):
    synthetic_images(
        tmp_path / "two", 2, (64, 64), seed=3
    )  # the crop is the whole image: the same batch each step
    cfg = load_config(
        VQVAEConfig,
        TINY,
        [
            f"run.dir={tmp_path / 'run'}",
            f"data.train={tmp_path / 'two'}",
            "data.val=''",
            "data.batch_size=2",
            "train.max_steps=16",
            "logging.every=1",
            "checkpoint.every=16",
        ],
    )
    train(cfg)
    losses = [e.value for e in events(tmp_path / "run").Scalars("train/loss")]
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:4]) / 4


def test_dead_codes_are_reseeded_from_recent_latents(tmp_path, folders):
    # Every code not picked in the last step is dead at step 4, the final step.
    train(
        tiny(
            tmp_path / "run",
            folders,
            *FAST,
            "train.max_steps=4",
            "codebook.dead_after=1",
            "codebook.reseed_every=4",
        )
    )
    reseeded = events(tmp_path / "run").Scalars("codebook/reseeded_codes")
    assert [e.step for e in reseeded] == [4] and reseeded[0].value > 0
    checkpoint = read_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000004.pt")
    codebook = checkpoint["models"]["vqvae"][CODEBOOK]
    keeper = checkpoint["models"]["codebook_keeper"]
    # Moved codes are unit-norm copies of buffered latents; the others keep their random norm.
    moved = (codebook.norm(dim=1) - 1).abs() < 1e-5
    assert int(moved.sum()) == reseeded[0].value
    assert torch.all(keeper["last_hit_step"][moved] == 4)
    recent = keeper["recent"][: int(keeper["num_seen"])]
    distances = torch.cdist(codebook[moved], recent, compute_mode="donot_use_mm_for_euclid_dist")
    assert distances.min(dim=1).values.max() < 1e-5


@pytest.mark.slow  # a few seconds of stage-0 training
def test_resume_matches_an_uninterrupted_run(tmp_path, folders):
    steps = [
        *FAST,
        "logging.every=1",
        "checkpoint.every=3",
        "codebook.dead_after=1",
        "codebook.reseed_every=2",
    ]
    train(tiny(tmp_path / "straight", folders, "train.max_steps=6", *steps))
    train(tiny(tmp_path / "stopped", folders, "train.max_steps=3", *steps))
    train(tiny(tmp_path / "stopped", folders, "train.max_steps=6", *steps))  # same command, longer: resumes
    straight = read_checkpoint(tmp_path / "straight" / "checkpoints" / "step_00000006.pt")
    resumed = read_checkpoint(tmp_path / "stopped" / "checkpoints" / "step_00000006.pt")
    for model in ("vqvae", "codebook_keeper"):
        for name, tensor in straight["models"][model].items():
            assert torch.equal(tensor, resumed["models"][model][name]), f"{model}.{name}"
    logged = events(tmp_path / "stopped")
    assert sorted({e.step for e in logged.Scalars("train/loss")}) == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in logged.Scalars("codebook/reseeded_codes")] == [2, 4, 6]


def test_bad_config_is_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli([str(TINY), "codebook.dead_after=0"])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert (
        len(lines) == 1
        and "codebook.dead_after" in lines[0]
        and "must be > 0" in lines[0]
        and str(TINY) in lines[0]
    )


@pytest.mark.slow
def test_two_processes_share_hits_and_reseed_identically(tmp_path, folders):
    synthetic_images(tmp_path / "val3", 3, (64, 64), seed=5)  # odd: Accelerate repeats one on a shard
    overrides = [
        f"run.dir={tmp_path / 'run'}",
        f"data.train={folders / 'train'}",
        *FAST,
        "data.batch_size=2",
        "train.max_steps=3",
        "logging.every=100",
        "checkpoint.every=2",
        "codebook.dead_after=1",
        "codebook.reseed_every=2",
        f"data.val={tmp_path / 'val3'}",
        "data.val_batch_size=1",
        "logging.val_every=3",
        "loss.lpips_weight=0",
    ]
    out = launch_two_processes(DDP_TRAIN, "vqvae", str(tmp_path), str(TINY), *overrides)
    assert "processes: 2" in out
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    for name, tensor in ranks[0]["params"].items():  # parameters, re-seeded codes and hit counters
        assert torch.equal(tensor, ranks[1]["params"][name]), name
    # At step 2 the hit counters of the main process hold the hits of both processes.
    at_step_2 = read_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000002.pt")["models"]
    positions_per_image = (64 // 8) ** 2
    assert (
        int(at_step_2["vqvae"]["bottleneck_op.child.child.codebook_hits_0"].sum())
        == 2 * 2 * 2 * positions_per_image
    )
    assert (
        int(at_step_2["codebook_keeper"]["num_seen"]) == 2 * 2 * 2
    )  # batch_size vectors per process and step
    # Validation counted each of the 3 images once (not Accelerate's repeat): the logged pooled
    # and per-image PSNRs are those of the three, recomputed here in one process from the final weights.
    final = read_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000003.pt")
    cfg = tiny(tmp_path / "unused", folders, *FAST, f"data.val={tmp_path / 'val3'}")
    vqvae = build_vqvae(cfg.model)
    vqvae.load_state_dict(final["models"]["vqvae"])
    images = torch.stack([image for image in val_dataset(cfg.data)])
    with torch.no_grad():
        mse = metrics.mse_255(vqvae.eval()(images).images.float().clamp(0, 1), images)
    assert final["metrics"]["val/psnr_per_image_mean"] == pytest.approx(
        metrics.psnr_of_mse(mse).double().mean().item(), rel=1e-5
    )
    assert final["metrics"]["val/psnr"] == pytest.approx(metrics.psnr_of_mse(mse.mean()).item(), rel=1e-5)
