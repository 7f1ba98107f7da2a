"""Stage 2 (GAN fine-tuning) on tiny models and generated images, starting from tiny stage-1 and
stage-0 runs made once for the module."""

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers.launch import DDP_TRAIN, launch_two_processes
from helpers.paths import REPO, TINY_CONFIGS
from helpers.synthetic import synthetic_images
from illm import zoo
from illm.checkpoint import read_checkpoint, step_checkpoints
from illm.config import load_config
from illm.errors import ConfigError, IllmError
from illm.experiment import FinetuneConfig
from illm.stages import finetune, pretrain, vqvae

TINY = str(TINY_CONFIGS / "finetune.toml")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions run fastest single-threaded, above all on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, one_thread):
    """Training images plus one-step tiny stage-1 and stage-0 runs."""
    root = tmp_path_factory.mktemp("finetune")
    synthetic_images(root / "train", 8, (64, 80), seed=0)
    synthetic_images(root / "val", 2, (192, 192), seed=1)
    common = [f"data.train={root / 'train'}", "data.val=", "train.max_steps=1", "checkpoint.every=1"]
    pretrain.main([str(TINY_CONFIGS / "pretrain.toml"), *common, f"run.dir={root / 'stage1'}"])
    vqvae.main([str(TINY_CONFIGS / "vqvae.toml"), *common, f"run.dir={root / 'stage0'}"])
    return root


def stage2_args(root: Path, run: str, *overrides: str) -> list[str]:
    return [
        TINY,
        f"data.train={root / 'train'}",
        "data.val=",
        f"run.dir={root / run}",
        f"init.autoencoder={root / 'stage1'}",
        f"init.labeller={root / 'stage0'}",
        "logging.every=1",
        *overrides,
    ]


def stage2(root: Path, run: str, *overrides: str) -> torch.nn.ModuleDict:
    """Run stage 2 in this process; returns its trained networks."""
    args = stage2_args(root, run, *overrides)
    return finetune.train(load_config(FinetuneConfig, args[0], args[1:]))


def scalars(run_dir: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


def stage1_weights(root: Path) -> dict[str, torch.Tensor]:
    return zoo.load(root / "stage1", kind="autoencoder").state_dict()


def assert_same(a: dict, b: dict, names) -> None:
    for name in names:
        assert torch.equal(a[name], b[name]), name


def test_only_the_generator_and_discriminator_train(workspace):
    nets = stage2(workspace, "plain", "train.max_steps=2", "checkpoint.every=1")
    before, after = stage1_weights(workspace), nets["autoencoder"].state_dict()
    frozen = [name for name, _ in nets["autoencoder"].named_parameters() if not name.startswith("decoder.")]
    assert frozen and any(name.startswith("hyper_bottleneck.") for name in frozen)
    assert_same(before, after, frozen)
    assert not all(torch.equal(before[n], after[n]) for n in after if n.startswith("decoder."))

    first, last = (read_checkpoint(path) for path in step_checkpoints(workspace / "plain"))
    assert (first["step"], last["step"]) == (1, 2)
    assert set(last["models"]) == {"autoencoder", "discriminator"}
    assert set(last["optimizers"]) == {"generator", "discriminator"}  # no quantile optimizer when frozen
    moved = [
        n
        for n, w in last["models"]["discriminator"].items()
        if not torch.equal(w, first["models"]["discriminator"][n])
    ]
    assert moved
    for tag in (
        "train/generator_loss",
        "train/discriminator_loss",
        "disc/real_accuracy",
        "disc/fake_accuracy",
        "optim/disc_grad_norm",
        "train/quantized_total_bpp",
    ):
        assert len(scalars(workspace / "plain", tag)) == 2, tag


def test_frozen_parameters_pass_gradients_through_without_keeping_any():
    layer = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3, requires_grad=True)
    with finetune.frozen_parameters(layer):
        y = layer(x)
    y.sum().backward()
    assert x.grad is not None and layer.weight.grad is None and layer.bias.grad is None
    assert layer.weight.requires_grad and layer.bias.requires_grad


def test_discriminator_learns_a_repeated_batch(tmp_path, workspace):
    # Two 64x64 images, batch 2, no split: every step shows the discriminator the same pictures.
    synthetic_images(tmp_path / "two", 2, (64, 64), seed=3)
    stage2(
        workspace,
        "repeated",
        "train.max_steps=6",
        f"data.train={tmp_path / 'two'}",
        "data.batch_size=2",
        "gan.mc_sampling=false",
        "optim.disc_lr=2e-3",
    )
    losses = scalars(workspace / "repeated", "train/discriminator_loss")
    assert len(losses) == 6
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses


def test_binary_baseline_needs_no_labeller(workspace):
    nets = stage2(
        workspace,
        "binary",
        "train.max_steps=1",
        "discriminator.target=binary",
        "init.labeller=no/such/labeller",
    )
    assert nets["discriminator"].num_classes == 2
    assert len(scalars(workspace / "binary", "disc/real_accuracy")) == 1


def test_trainable_bottleneck_gets_the_quantile_optimizer(workspace):
    nets = stage2(workspace, "open", "train.max_steps=1", "freeze.bottleneck=false")
    before, after = stage1_weights(workspace), nets["autoencoder"].state_dict()
    assert_same(before, after, [n for n in after if n.startswith("encoder.")])
    assert not torch.equal(before["hyper_bottleneck.quantiles"], after["hyper_bottleneck.quantiles"])
    assert not torch.equal(before["hyper_analysis.0.weight"], after["hyper_analysis.0.weight"])
    assert set(read_checkpoint(step_checkpoints(workspace / "open")[-1])["optimizers"]) == {
        "generator",
        "discriminator",
        "aux",
    }


def test_bf16_run(workspace):
    nets = stage2(workspace, "bf16", "train.max_steps=2", "train.mixed_precision=bf16")
    assert all(torch.isfinite(p).all() for p in nets.parameters())
    assert all(map(torch.isfinite, map(torch.tensor, scalars(workspace / "bf16", "train/total_model_loss"))))


def test_resume_continues_exactly(workspace):
    straight = stage2(workspace, "straight", "train.max_steps=2", "checkpoint.every=1")
    stage2(workspace, "stopped", "train.max_steps=1", "checkpoint.every=1")
    resumed = stage2(workspace, "stopped", "train.max_steps=2", "checkpoint.every=1")
    assert [read_checkpoint(p)["step"] for p in step_checkpoints(workspace / "stopped")] == [1, 2]
    a, b = straight.state_dict(), resumed.state_dict()
    assert_same(a, b, a)


@pytest.mark.slow  # two child processes
def test_two_values_sweep_makes_two_runs(workspace, capsys):
    finetune.cli(
        [*stage2_args(workspace, "sweep", "train.max_steps=1"), "--sweep", "gan.generator_weight=0.004,0.016"]
    )
    for value in ("0.004", "0.016"):
        run = workspace / "sweep" / f"gan.generator_weight={value}"
        assert read_checkpoint(step_checkpoints(run)[-1])["step"] == 1
        assert f"generator_weight = {value}" in (run / "config.toml").read_text()
    assert "[sweep] summary" in capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_keep_identical_weights(workspace, tmp_path):
    launch_two_processes(
        DDP_TRAIN,
        "finetune",
        str(tmp_path),
        *stage2_args(workspace, "ddp", "train.max_steps=2", "checkpoint.every=100"),
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world"] for r in ranks} == {2}
    params0, params1 = ranks[0]["params"], ranks[1]["params"]
    assert_same(params0, params1, params0)
    before = stage1_weights(workspace)
    assert not torch.equal(before["decoder.blocks.4.weight"], params0["autoencoder.decoder.blocks.4.weight"])


@pytest.mark.slow
def test_sweep_in_two_processes_runs_every_experiment(workspace):
    # Each experiment ends its Accelerator; the next one must find the process group still up.
    out = launch_two_processes(
        REPO / "scripts/finetune_gan.py",
        *stage2_args(workspace, "ddp_sweep", "train.max_steps=1"),
        "--sweep",
        "gan.generator_weight=0.004,0.016",
    )
    assert out.count("processes: 2") == 2
    for value in ("0.004", "0.016"):
        assert step_checkpoints(workspace / "ddp_sweep" / f"gan.generator_weight={value}")


def test_bad_settings_fail_with_one_line(workspace):
    with pytest.raises(ConfigError, match="fp16"):
        load_config(FinetuneConfig, TINY, ["train.mixed_precision=fp16"])
    with pytest.raises(ConfigError, match="discriminator.channels"):
        load_config(FinetuneConfig, TINY, ["discriminator.channels=[16, 16]"])
    with pytest.raises(IllmError, match="no/such/run"):
        stage2(workspace, "missing", "init.autoencoder=no/such/run")
