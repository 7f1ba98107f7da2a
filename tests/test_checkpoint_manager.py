"""The checkpoint manager decides: cadence, keep-last over intact files only, and best.pt judged by
a validation at the checkpoint's own step. The divergence guard stops a run before a non-finite
checkpoint exists, and a lower LR given on resume takes effect."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers.paths import REPO, TINY_CONFIGS
from helpers.synthetic import synthetic_images
from illm.checkpoint import CheckpointManager, TrainingState, read_checkpoint, step_checkpoints
from illm.config import load_config
from illm.divergence import Diverged, check_finite
from illm.experiment import CheckpointSection, PretrainConfig
from illm.optimizer import lr_schedule
from illm.stages.pretrain import train

TINY = TINY_CONFIGS / "pretrain.toml"


class Stream:
    def state_dict(self):
        return {"epoch": 0, "batches_done": 0}

    def load_state_dict(self, state):
        pass


def manager_and_state(run_dir, **checkpoint):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = CheckpointSection(**{"every": 1, "keep_last": 2, "best_metric": "val/psnr", **checkpoint})
    manager = CheckpointManager(run_dir, cfg, Accelerator(cpu=True), max_steps=100, config_toml="")
    state = TrainingState({"model": model}, {"model": optimizer}, {}, Stream(), {"model": 1e-3})
    return manager, state


def test_keep_last_counts_intact_checkpoints_only(tmp_path):
    manager, state = manager_and_state(tmp_path, keep_last=2)
    manager.save(1, state)
    manager.save(2, state)
    damaged = manager.path_for(3)
    damaged.write_bytes(manager.path_for(2).read_bytes()[:200])  # a truncated copy
    manager.save(4, state)
    names = [p.name for p in step_checkpoints(tmp_path)]
    # The damaged file stays (nothing a user may want is deleted) and does not count: the two
    # newest intact ones are kept.
    assert names == ["step_00000002.pt", "step_00000003.pt", "step_00000004.pt"]
    manager.save(5, state)
    assert [p.name for p in step_checkpoints(tmp_path)] == [
        "step_00000003.pt",
        "step_00000004.pt",
        "step_00000005.pt",
    ]
    assert manager.latest_intact() == manager.path_for(5)


def test_a_damaged_newest_file_never_costs_the_newest_intact_checkpoint(tmp_path):
    manager, state = manager_and_state(tmp_path, keep_last=1)
    manager.save(1, state)
    manager.path_for(9).write_bytes(b"not a zip")
    manager.prune()
    assert manager.path_for(1).exists()
    assert manager.latest_intact() == manager.path_for(1)


def test_best_follows_a_scripted_sequence_of_metrics(tmp_path):
    manager, state = manager_and_state(tmp_path)
    sequence = {1: 20.0, 2: None, 3: 22.5, 4: 21.0, 5: float("nan"), 6: 23.0, 7: None}
    for step, psnr in sequence.items():
        manager.save(step, state, None if psnr is None else {"val/psnr": psnr})
        record = json.loads((tmp_path / "checkpoints" / "best.json").read_text())
        best_step = max(
            (s for s, v in sequence.items() if s <= step and v == v and v is not None),
            key=lambda s: sequence[s],
        )
        assert record == {"metric": "val/psnr", "value": sequence[best_step], "step": best_step}
        assert read_checkpoint(tmp_path / "checkpoints" / "best.pt")["step"] == best_step


def test_best_in_min_mode_and_a_record_for_another_metric_is_replaced(tmp_path):
    manager, state = manager_and_state(tmp_path, best_metric="val/lpips", best_mode="min")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best.json").write_text(
        json.dumps({"metric": "val/psnr", "value": 99.0, "step": 1})
    )
    manager.save(2, state, {"val/lpips": 0.5, "val/psnr": 10.0})
    assert json.loads((tmp_path / "checkpoints" / "best.json").read_text())["metric"] == "val/lpips"
    manager.save(3, state, {"val/lpips": 0.7})
    manager.save(4, state, {"val/lpips": 0.3})
    assert json.loads((tmp_path / "checkpoints" / "best.json").read_text())["step"] == 4


def fake_run(tmp_path, scaler=None):
    manager, _ = manager_and_state(tmp_path)
    accelerator = SimpleNamespace(
        scaler=scaler, device=torch.device("cpu"), num_processes=1, is_main_process=True
    )
    return SimpleNamespace(
        accelerator=accelerator, checkpoints=manager, config=load_config(PretrainConfig, None)
    )


def test_the_guard_names_the_quantity_and_the_last_intact_checkpoint(tmp_path):
    run = fake_run(tmp_path)
    model = torch.nn.Linear(2, 2)
    logs = {"train/total_loss": torch.tensor(1.0), "optim/grad_norm": torch.tensor(2.0), "optim/lr": 0.1}
    check_finite(run, 7, logs, {"autoencoder": model})  # all finite: nothing happens
    with pytest.raises(Diverged, match=r"iteration 7: optim/grad_norm is not finite; no checkpoint"):
        check_finite(run, 7, {**logs, "optim/grad_norm": torch.tensor(float("inf"))}, {"autoencoder": model})
    run.checkpoints.save(5, manager_and_state(tmp_path)[1])
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(
        Diverged, match=r"a parameter of the autoencoder .*step_00000005.pt.* optim.lr=<below 0.0003>"
    ):
        check_finite(run, 8, logs, {"autoencoder": model})


def test_under_a_loss_scaler_an_infinite_gradient_norm_is_a_skipped_step(tmp_path):
    run = fake_run(tmp_path, scaler=object())
    logs = {"train/total_loss": torch.tensor(1.0), "optim/grad_norm": torch.tensor(float("inf"))}
    check_finite(run, 3, logs, {"m": torch.nn.Linear(2, 2)})
    with pytest.raises(Diverged, match="train/total_loss"):
        check_finite(
            run, 3, {**logs, "train/total_loss": torch.tensor(float("nan"))}, {"m": torch.nn.Linear(2, 2)}
        )


def test_a_new_base_lr_applies_on_top_of_the_restored_schedule(tmp_path):
    from illm.checkpoint import set_base_lr

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = lr_schedule(optimizer, "ramp_quarter_cosine", 10, 100)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    set_base_lr(optimizer, scheduler, 1e-5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5 * 0.4)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5 * 0.5)


# --- end to end, on the tiny stage-1 config ------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("manager_data")
    synthetic_images(root / "train", 8, (80, 96), seed=0)
    synthetic_images(root / "val", 2, (192, 192), seed=1)
    return root


def tiny(run_dir, folders, *overrides):
    base = [f"run.dir={run_dir}", f"data.train={folders / 'train'}", f"data.val={folders / 'val'}"]
    return load_config(PretrainConfig, TINY, base + list(overrides))


def logged(run_dir, tag):
    events = EventAccumulator(str(Path(run_dir) / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {}


def test_best_json_names_a_step_whose_logged_value_it_holds(tmp_path, folders):
    run = tmp_path / "run"
    overrides = ["train.max_steps=7", "logging.every=1", "logging.val_every=2", "checkpoint.every=3"]
    train(tiny(run, folders, *overrides, 'checkpoint.best_metric="val/psnr"', "checkpoint.keep_last=5"))
    psnr = logged(run, "val/psnr")
    assert sorted(psnr) == [2, 3, 4, 6, 7]  # every val_every, and every checkpoint (3, 6 and the end)
    record = json.loads((run / "checkpoints" / "best.json").read_text())
    assert record["step"] in (3, 6, 7) and record["metric"] == "val/psnr"
    assert record["value"] == pytest.approx(psnr[record["step"]], rel=1e-6)
    assert record["value"] == pytest.approx(max(psnr[s] for s in (3, 6, 7)), rel=1e-6)


def run_cli(*args) -> subprocess.CompletedProcess:
    env_path = {"PYTHONPATH": str(REPO)}
    import os

    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "pretrain.py"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env_path, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )


@pytest.mark.slow
def test_divergence_stops_cleanly_and_a_lower_lr_continues(tmp_path, folders):
    run = tmp_path / "run"
    base = [str(TINY), f"run.dir={run}", f"data.train={folders / 'train'}", "data.val=''", "logging.every=1"]
    first = run_cli(*base, "train.max_steps=2", "checkpoint.every=1")
    assert first.returncode == 0, first.stderr
    last = run / "checkpoints" / "step_00000002.pt"
    diverging = run_cli(
        *base, "train.max_steps=6", "checkpoint.every=1", "optim.lr=1e30", f"run.resume_from={last}"
    )
    assert diverging.returncode == 1
    error = diverging.stderr.strip().splitlines()
    assert len(error) == 1 and "Traceback" not in diverging.stderr, diverging.stderr
    assert "diverged at iteration 3" in error[0] and str(last) in error[0] and "optim.lr=" in error[0]
    for path in step_checkpoints(run):
        params = read_checkpoint(path)["models"]["autoencoder"]
        assert all(torch.isfinite(t).all() for t in params.values() if t.is_floating_point()), path
    assert [p.name for p in step_checkpoints(run)] == ["step_00000001.pt", "step_00000002.pt"]

    resumed = run_cli(
        *base, "train.max_steps=4", "checkpoint.every=1", "optim.lr=1e-4", f"run.resume_from={last}"
    )
    assert resumed.returncode == 0, resumed.stderr
    lr = logged(run, "optim/lr")
    cfg = tiny(run, folders)
    from illm.optimizer import LR_SCHEDULES

    factor = LR_SCHEDULES[cfg.optim.schedule]
    for step in (3, 4):  # iteration `step` runs at schedule position step - 1
        expected = 1e-4 * factor(step - 1, cfg.optim.warmup_steps, cfg.optim.decay_steps)
        assert lr[step] == pytest.approx(expected, rel=1e-6)


def test_a_resumed_run_purges_what_was_logged_after_its_checkpoint(tmp_path, folders):
    run = tmp_path / "run"
    steps = ["logging.every=1", "checkpoint.every=2", "data.val=''", "checkpoint.keep_last=5"]
    train(tiny(run, folders, "train.max_steps=3", *steps))
    (run / "checkpoints" / "step_00000003.pt").unlink()  # as if killed after logging step 3
    first_three = logged(run, "train/total_loss")[3]
    train(tiny(run, folders, "train.max_steps=4", *steps))  # resumes from step 2
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    steps_logged = [e.step for e in events.Scalars("train/total_loss")]
    assert steps_logged == [1, 2, 3, 4]  # step 3 once: the interrupted run's was purged
    assert logged(run, "train/total_loss")[3] == pytest.approx(first_three, rel=1e-6)  # same data, same RNG


def test_stale_temporaries_of_our_writer_are_removed_and_nothing_else(tmp_path):
    manager, _ = manager_and_state(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    ours = [
        tmp_path / "checkpoints" / ".step_00000010.pt.0a1b2c3d.tmp",
        tmp_path / "checkpoints" / ".best.pt.deadbeef.tmp",
        tmp_path / "checkpoints" / ".best.json.00000000.tmp",
        tmp_path / ".config.toml.12345678.tmp",
    ]
    others = [
        tmp_path / "checkpoints" / "step_00000010.pt",
        tmp_path / "checkpoints" / ".step_00000010.pt.notours.tmp",
        tmp_path / "checkpoints" / "notes.tmp",
        tmp_path / ".mydata.12345678.tmp",
    ]
    for path in ours + others:
        path.write_bytes(b"x")
    assert sorted(manager.remove_stale_temporaries()) == sorted(ours)
    assert not any(path.exists() for path in ours) and all(path.exists() for path in others)
