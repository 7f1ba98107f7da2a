"""Experiment configs: strict loading, type coercion, overrides, renamed keys, the TOML round trip,
and every released TOML loads and validates."""

from pathlib import Path

import pytest

from helpers.paths import REPO, TINY_CONFIGS
from illm.config import RENAMED_KEYS, load_config, to_toml
from illm.errors import ConfigError
from illm.experiment import FinetuneConfig, PretrainConfig, VQVAEConfig

CONFIG_CLASSES = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "vqvae": VQVAEConfig}


def config_class_for(path: Path):
    if path.name.startswith("finetune"):
        return FinetuneConfig
    if path.name.startswith("vqvae"):
        return VQVAEConfig
    return PretrainConfig


RELEASED = sorted((REPO / "configs").glob("*.toml")) + sorted(TINY_CONFIGS.glob("*.toml"))


@pytest.mark.parametrize("path", RELEASED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_released_config_loads_validates_and_round_trips(path, tmp_path):
    config = load_config(config_class_for(path), path)
    written = tmp_path / "again.toml"
    written.write_text(to_toml(config))
    assert load_config(config_class_for(path), written) == config


def test_released_stage_configs_pin_their_global_batch():
    for path in (REPO / "configs").glob("*.toml"):
        assert load_config(config_class_for(path), path).data.global_batch_size > 0, path.name


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_unknown_key_names_the_file_and_the_closest_key(tmp_path):
    path = write(tmp_path, "[optim]\nlrr = 0.1\n")
    with pytest.raises(ConfigError, match=r"c.toml: unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        load_config(PretrainConfig, path)


def test_unknown_section_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section '\[optimm\]'"):
        load_config(PretrainConfig, write(tmp_path, "[optimm]\nlr = 0.1\n"))


@pytest.mark.parametrize("old", sorted(RENAMED_KEYS))
def test_a_renamed_key_under_its_old_name_names_the_new_one(old, tmp_path):
    section, key = old.split(".")
    path = write(tmp_path, f"[{section}]\n{key} = 1\n")
    with pytest.raises(ConfigError, match=f"key '{old}' was renamed: use '{RENAMED_KEYS[old]}'"):
        load_config(PretrainConfig, path)
    with pytest.raises(ConfigError, match="was renamed"):
        load_config(PretrainConfig, None, [f"{old}=1"])


def test_types_are_coerced_and_checked():
    cfg = load_config(PretrainConfig, None, ["optim.lr=1", "train.max_steps=7", "data.train=some/dir"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 7 and cfg.data.train == "some/dir"
    with pytest.raises(ConfigError, match="key 'train.max_steps': expected int"):
        load_config(PretrainConfig, None, ["train.max_steps=1.5"])
    with pytest.raises(ConfigError, match="key 'train.channels_last': expected true or false"):
        load_config(PretrainConfig, None, ["train.channels_last=1"])
    with pytest.raises(ConfigError, match="key 'optim.lr': expected float"):
        load_config(PretrainConfig, None, ["optim.lr=true"])
    with pytest.raises(ConfigError, match="key 'optim.lr': must be > 0"):
        load_config(PretrainConfig, None, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match="is not one of"):
        load_config(PretrainConfig, None, ["optim.schedule=linear"])


def test_a_file_that_is_not_toml_or_missing_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(PretrainConfig, write(tmp_path, "[optim\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(PretrainConfig, tmp_path / "nope.toml")


def test_a_stage_section_keeps_the_stage_defaults():
    # A file that leaves out a key keeps *this* stage's default, not the section class's.
    assert load_config(FinetuneConfig, None, ["data.crop_size=256"]).data.batch_size == 16
    assert load_config(FinetuneConfig, None).rate.switch_step == 0
    assert load_config(PretrainConfig, None).rate.switch_step == 25_000


@pytest.mark.parametrize("cls", CONFIG_CLASSES.values(), ids=CONFIG_CLASSES)
def test_every_field_and_section_has_a_doc(cls):
    import dataclasses

    for section in dataclasses.fields(cls):
        assert section.metadata["doc"].strip(), section.name
        for field in dataclasses.fields(
            section.type if isinstance(section.type, type) else type(section.default_factory())
        ):
            assert field.metadata["doc"].strip(), f"{section.name}.{field.name}"


def test_each_stage_loop_reads_in_one_screen():
    """Each stage's `train()` is build, resume, then the loop of `if due` lines (at most 45 lines)."""
    import ast

    for name in ("vqvae", "pretrain", "finetune"):
        tree = ast.parse((REPO / "illm" / "stages" / f"{name}.py").read_text())
        (train,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "train"]
        assert train.end_lineno - train.lineno + 1 <= 45, name
