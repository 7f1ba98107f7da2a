"""Sweeps: value parsing, cross products, run folders, --sweep-index, failures; with a stand-in
`main` that records its arguments instead of training."""

import os
from pathlib import Path

import pytest

from helpers import sweep_child
from helpers.paths import REPO, TINY_CONFIGS
from illm.config import load_config
from illm.errors import ConfigError, IllmError
from illm.experiment import FinetuneConfig
from illm.sweep import experiments, in_own_process, parse_sweep, run_with_sweeps, split_values

TINY = str(TINY_CONFIGS / "finetune.toml")


class Recorder:
    """A stage `main` that loads the config it is given and remembers it."""

    def __init__(self, fail_when: str | None = None):
        self.configs = []
        self.fail_when = fail_when

    def __call__(self, argv):
        self.configs.append(load_config(FinetuneConfig, argv[0], argv[1:]))
        if self.fail_when and any(self.fail_when in arg for arg in argv):
            raise IllmError("this experiment fails")


def sweep(main, *args):
    """A sweep whose experiments run in this process, so that `main` can record them."""
    run_with_sweeps(
        main, FinetuneConfig, [TINY, "run.dir=/tmp/base", *args], usage="usage", run_experiment=main
    )


def test_values_split_at_top_level_commas_only():
    assert split_values("1, 2.5,abc") == ["1", "2.5", "abc"]
    assert split_values('[1, 2],[3, 4],"a,b"') == ["[1, 2]", "[3, 4]", '"a,b"']


def test_one_experiment_per_value_in_its_own_folder():
    main = Recorder()
    sweep(main, "--sweep", "gan.generator_weight=0.004,0.016", "train.max_steps=7")
    assert [c.gan.generator_weight for c in main.configs] == [0.004, 0.016]
    assert [c.run.dir for c in main.configs] == [
        "/tmp/base/gan.generator_weight=0.004",
        "/tmp/base/gan.generator_weight=0.016",
    ]
    assert {c.train.max_steps for c in main.configs} == {7}  # the other overrides apply to every experiment


def test_several_sweeps_give_the_cross_product_with_typed_values():
    main = Recorder()
    sweep(
        main,
        "--sweep=discriminator.channels=[16,16,32,32],[8,8,16,16]",
        "--sweep",
        "init.labeller=runs/a b,runs/c",
    )
    assert [(c.discriminator.channels, c.init.labeller) for c in main.configs] == [
        ([16, 16, 32, 32], "runs/a b"),
        ([16, 16, 32, 32], "runs/c"),
        ([8, 8, 16, 16], "runs/a b"),
        ([8, 8, 16, 16], "runs/c"),
    ]
    assert Path(main.configs[1].run.dir).name == "discriminator.channels=_16_16_32_32_,init.labeller=runs_c"


def test_sweep_index_runs_one_experiment():
    main = Recorder()
    sweep(main, "--sweep", "gan.generator_weight=0.004,0.008,0.016", "--sweep-index", "2")
    assert [c.gan.generator_weight for c in main.configs] == [0.016]
    with pytest.raises(ConfigError, match="3 experiments"):
        sweep(Recorder(), "--sweep", "gan.generator_weight=0.004,0.008,0.016", "--sweep-index", "3")


def test_every_config_is_checked_before_anything_runs():
    main = Recorder()
    with pytest.raises(ConfigError, match="gan.generator_weight"):
        sweep(main, "--sweep", "gan.generator_weight=0.004,-1")
    with pytest.raises(ConfigError, match="generator_wieght"):
        sweep(main, "--sweep", "gan.generator_wieght=1,2")
    assert main.configs == []


def test_a_failed_experiment_does_not_stop_the_others(capsys):
    main = Recorder(fail_when="0.008")
    with pytest.raises(IllmError, match="1 of 3 sweep experiments failed"):
        sweep(main, "--sweep", "gan.generator_weight=0.004,0.008,0.016")
    assert len(main.configs) == 3
    assert "failed: this experiment fails" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sweep", "gan.generator_weight"], "expected section.key=v1,v2"),
        (["--sweep", "gan.generator_weight=1,,2"], "empty value"),
        (["--sweep", "run.dir=a,b"], "run.dir cannot be swept"),
        (["--sweep", "gan.generator_weight=1,2", "--sweep", "gan.generator_weight=3"], "swept twice"),
        (["--sweep", "init.labeller=a/b,a_b"], "share the run folder"),
        (["--sweep-index", "0"], "needs at least one --sweep"),
        (["--sweep", "gan.generator_weight=1", "--sweep-index", "x"], "expected an integer"),
        (["--sweep"], "needs a value"),
    ],
)
def test_bad_sweeps_fail_with_one_line(args, message):
    with pytest.raises(ConfigError, match=message):
        sweep(Recorder(), *args)


def test_without_sweep_main_gets_the_arguments_unchanged():
    seen = []
    run_with_sweeps(seen.append, FinetuneConfig, [TINY, "train.max_steps=3"], usage="usage")
    assert seen == [[TINY, "train.max_steps=3"]]


def test_sweep_parses_keys_and_experiments_are_numbered():
    points = experiments([parse_sweep("gan.generator_weight=1,2"), parse_sweep("distortion.lam=3")])
    assert [(p.index, p.overrides) for p in points] == [
        (0, ["gan.generator_weight=1", "distortion.lam=3"]),
        (1, ["gan.generator_weight=2", "distortion.lam=3"]),
    ]


@pytest.mark.slow
def test_each_experiment_runs_in_a_process_of_its_own(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("PYTHONPATH", str(REPO / "tests"))
    run = in_own_process(sweep_child.write_pid)
    run([str(tmp_path / "first")])
    run([str(tmp_path / "second")])
    pids = {(tmp_path / name).read_text() for name in ("first", "second")}
    assert len(pids) == 2 and str(os.getpid()) not in pids
    with pytest.raises(IllmError, match="exit code 1"):
        in_own_process(sweep_child.fail)([])
    assert "error: this experiment fails" in capfd.readouterr().err  # the child's one-line error


@pytest.mark.parametrize(
    "stage, config_cls, config, key, values",
    [
        ("vqvae", "VQVAEConfig", "vqvae.toml", "codebook.dead_after", (50, 80)),
        ("pretrain", "PretrainConfig", "pretrain.toml", "rate.target_bpp", (0.1, 0.2)),
        ("finetune", "FinetuneConfig", "finetune.toml", "gan.generator_weight", (0.004, 0.016)),
    ],
)
def test_every_stage_script_sweeps_with_the_same_syntax(monkeypatch, stage, config_cls, config, key, values):
    """`cli` of each stage routes --sweep/--sweep-index; experiment 1 runs here (the --sweep-index path)."""
    import importlib

    from illm import experiment

    module = importlib.import_module(f"illm.stages.{stage}")
    cls = getattr(experiment, config_cls)
    seen = []
    monkeypatch.setattr(module, "main", lambda argv: seen.append(load_config(cls, argv[0], argv[1:])))
    sweep_text = f"{key}=" + ",".join(str(v) for v in values)
    path = str(TINY_CONFIGS / config)
    module.cli([path, "run.dir=/tmp/base", "--sweep", sweep_text, "--sweep-index", "1"])
    section, name = key.split(".")
    assert [getattr(getattr(c, section), name) for c in seen] == [values[1]]
    assert seen[0].run.dir == f"/tmp/base/{key}={values[1]}"


def test_a_stage_sweep_with_a_bad_key_is_one_line(capsys):
    from illm.stages import pretrain

    with pytest.raises(SystemExit) as exit_info:
        pretrain.cli([str(TINY_CONFIGS / "pretrain.toml"), "--sweep", "rate.target=0.1,0.2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("pretrain.py: error: ") and err.count("\n") == 1
    assert "rate.target" in err
