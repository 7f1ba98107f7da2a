"""A damaged latest checkpoint: refused with the last intact one named, resumed with run.resume_from."""

from pathlib import Path

import pytest

from helpers.paths import TINY_CONFIGS
from helpers.synthetic import synthetic_images
from illm.checkpoint import read_checkpoint, resume_point
from illm.config import load_config
from illm.errors import IllmError
from illm.experiment import PretrainConfig
from illm.stages.pretrain import train

TINY = TINY_CONFIGS / "pretrain.toml"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny stage-1 run with checkpoints at steps 1 and 2."""
    root = tmp_path_factory.mktemp("resume")
    synthetic_images(root / "train", 4, (64, 64), seed=0)
    train(config(root / "run", "train.max_steps=2", data=root / "train"))
    return root / "run"


def config(run_dir: Path, *overrides: str, data: Path | None = None) -> PretrainConfig:
    data = data or run_dir.parent / "train"
    base = [
        f"run.dir={run_dir}",
        f"data.train={data}",
        "data.val=''",
        "checkpoint.every=1",
        "logging.every=1",
    ]
    return load_config(PretrainConfig, TINY, base + list(overrides))


def step(run_dir: Path, number: int) -> Path:
    return run_dir / "checkpoints" / f"step_{number:08d}.pt"


def test_truncated_latest_is_refused_naming_the_last_intact_one(run):
    latest, intact = step(run, 2), step(run, 1)
    original = latest.read_bytes()
    latest.write_bytes(original[: len(original) // 2])
    try:
        with pytest.raises(IllmError) as refused:
            train(config(run, "train.max_steps=3"))
        message = str(refused.value)
        assert "\n" not in message
        assert str(latest) in message and f"run.resume_from={intact}" in message and "move" in message
        assert latest.stat().st_size == len(original) // 2  # nothing deleted or rewritten
    finally:
        latest.write_bytes(original)


def test_a_flipped_byte_is_found_by_the_crc(run):
    latest = step(run, 2)
    original = latest.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 3] ^= 0xFF
    latest.write_bytes(bytes(damaged))
    try:
        with pytest.raises(IllmError, match=f"the last intact one is {step(run, 1)}"):
            resume_point(run)
    finally:
        latest.write_bytes(original)
    assert resume_point(run) == latest


def test_resume_from_continues_from_the_given_checkpoint(run, tmp_path):
    copy = tmp_path / "run"
    (copy / "checkpoints").mkdir(parents=True)
    for number in (1, 2):
        step(copy, number).write_bytes(step(run, number).read_bytes())
    (copy / "config.toml").write_text((run / "config.toml").read_text().replace(str(run), str(copy)))
    step(copy, 2).write_bytes(b"PK\x03\x04 cut short")
    train(config(copy, "train.max_steps=2", f"run.resume_from={step(copy, 1)}", data=run.parent / "train"))
    resumed = read_checkpoint(
        step(copy, 2)
    )  # step 2 trained again from step 1, written over the damaged file
    assert resumed["step"] == 2


def test_nothing_intact_and_missing_resume_from(run, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    step(tmp_path, 5).write_bytes(b"not a zip")
    with pytest.raises(IllmError, match="no intact one before it"):
        resume_point(tmp_path)
    with pytest.raises(IllmError, match="run.resume_from=.*no such checkpoint"):
        resume_point(tmp_path, tmp_path / "missing.pt")
    with pytest.raises(IllmError, match="run.resume_from=.*unreadable"):
        resume_point(tmp_path, step(tmp_path, 5))
