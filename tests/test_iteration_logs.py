"""What TensorBoard shows is the iteration: a tiny stage 2 logs the same first-iteration
`train/distortion_loss` and `train/psnr` as one process with two micro-batches of 4 and as two CPU
processes with one micro-batch of 4 each (global batch 8 both ways).

Both start from the same tiny stage-1 and stage-0 runs, with the encoder and the entropy models
frozen (eval mode: no quantization noise), and see the same eight images: the shuffle and every
image's crop are seeded by the run seed and the image, not by the process.
"""

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers.launch import DDP_TRAIN, launch_two_processes
from helpers.paths import REPO, TINY_CONFIGS
from helpers.synthetic import synthetic_images
from illm import zoo
from illm.config import load_config
from illm.experiment import FinetuneConfig
from illm.stages import finetune, pretrain, vqvae


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("iteration_logs")
    synthetic_images(root / "train", 8, (64, 80), seed=0)
    common = [f"data.train={root / 'train'}", "data.val=", "train.max_steps=1", "checkpoint.every=1"]
    pretrain.main([str(TINY_CONFIGS / "pretrain.toml"), *common, f"run.dir={root / 'stage1'}"])
    vqvae.main([str(TINY_CONFIGS / "vqvae.toml"), *common, f"run.dir={root / 'stage0'}"])
    return root


def stage2_args(root: Path, run: str, batch_size: int) -> list[str]:
    return [
        str(TINY_CONFIGS / "finetune.toml"),
        f"data.train={root / 'train'}",
        "data.val=",
        f"run.dir={root / run}",
        f"init.autoencoder={root / 'stage1'}",
        f"init.labeller={root / 'stage0'}",
        "freeze.encoder=true",
        "freeze.bottleneck=true",
        "data.global_batch_size=8",
        f"data.batch_size={batch_size}",
        "train.max_steps=1",
        "logging.every=1",
        "checkpoint.every=100",
    ]


def first_logged(run_dir: Path, tag: str) -> float:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    (event,) = [e for e in events.Scalars(tag) if e.step == 1]
    return event.value


@pytest.mark.slow
def test_two_micro_batches_log_what_two_processes_log(workspace):
    args = stage2_args(workspace, "one_process", batch_size=4)
    config = load_config(FinetuneConfig, args[0], args[1:])
    finetune.train(config)  # one process: two micro-batches of 4
    launch_two_processes(
        REPO / "scripts/finetune_gan.py", *stage2_args(workspace, "two_processes", batch_size=4)
    )
    for tag in ("train/distortion_loss", "train/psnr", "train/mse"):
        one = first_logged(workspace / "one_process", tag)
        two = first_logged(workspace / "two_processes", tag)
        assert one == pytest.approx(two, rel=1e-5), tag
    # and not merely the first micro-batch: the second one changes the logged value
    first_only = stage2_args(workspace, "first_micro_batch", batch_size=4)
    finetune.train(load_config(FinetuneConfig, first_only[0], [*first_only[1:], "data.global_batch_size=4"]))
    assert first_logged(workspace / "first_micro_batch", "train/distortion_loss") != pytest.approx(
        first_logged(workspace / "one_process", "train/distortion_loss"), rel=1e-5
    )


@pytest.mark.slow
def test_unfrozen_stage2_keeps_two_processes_identical(workspace, tmp_path):
    """Recipe (a) under DDP: the encoder, hyperprior and quantiles train (the quantiles' gradients
    averaged by hand), and both processes end with the same weights."""
    args = stage2_args(workspace, "unfrozen_ddp", batch_size=4)
    args = [*args, "freeze.encoder=false", "freeze.bottleneck=false", "train.max_steps=2"]
    launch_two_processes(DDP_TRAIN, "finetune", str(tmp_path), *args)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["params"] for r in (0, 1)]
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name
    before = zoo.load(workspace / "stage1", kind="autoencoder").state_dict()
    for name in ("encoder.blocks.0.0.weight", "hyper_analysis.0.weight", "hyper_bottleneck.quantiles"):
        assert not torch.equal(before[name], ranks[0][f"autoencoder.{name}"]), name
