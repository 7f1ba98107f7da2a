"""TF32 switches (issue 18, point 6): off while coding and evaluating, ``train.allow_tf32`` in training.

A CPU has no TF32, but the switches are process-wide flags that it can read."""

import pytest
import torch

from illm import backends, evaluate, tiling
from illm.config import load_config
from illm.experiment import PretrainConfig
from illm.models.hific import HiFiCAutoencoder

NEW_NAMES = hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision")


@pytest.fixture(autouse=True)
def restore_flags():
    state = backends.tf32_state()
    yield
    backends.restore_tf32(state)


@pytest.mark.parametrize("allowed", [True, False])
def test_full_float32_turns_tf32_off_and_restores_the_flags(allowed):
    torch.backends.cudnn.allow_tf32 = allowed
    torch.backends.cuda.matmul.allow_tf32 = allowed
    assert backends.tf32_disabled() is not allowed
    with backends.full_float32():
        assert backends.tf32_disabled()
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.allow_tf32 is allowed and torch.backends.cuda.matmul.allow_tf32 is allowed


def test_full_float32_restores_the_flags_after_an_error():
    torch.backends.cudnn.allow_tf32 = True
    with pytest.raises(ValueError), backends.full_float32():
        raise ValueError
    assert torch.backends.cudnn.allow_tf32


@pytest.mark.skipif(not NEW_NAMES, reason="PyTorch < 2.9 has only the allow_tf32 flags")
def test_full_float32_with_settings_made_through_the_new_names():
    """Once ``fp32_precision`` settings disagree, the old flags raise on reading: the new names are used."""
    conv, rnn, matmul = torch.backends.cudnn.conv, torch.backends.cudnn.rnn, torch.backends.cuda.matmul
    conv.fp32_precision, rnn.fp32_precision, matmul.fp32_precision = "tf32", "ieee", "tf32"
    with pytest.raises(RuntimeError):
        torch.backends.cudnn.allow_tf32  # noqa: B018
    assert not backends.tf32_disabled()
    with backends.full_float32():
        assert backends.tf32_disabled()
        assert conv.fp32_precision == "ieee" and matmul.fp32_precision == "ieee"
    assert (conv.fp32_precision, rnn.fp32_precision, matmul.fp32_precision) == ("tf32", "ieee", "tf32")


def test_allow_tf32_convolutions_leaves_matrix_products_alone():
    torch.backends.cuda.matmul.allow_tf32 = False
    backends.allow_tf32_convolutions(False)
    assert not torch.backends.cudnn.allow_tf32
    backends.allow_tf32_convolutions(True)
    assert torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_coding_runs_without_tf32(monkeypatch):
    torch.backends.cudnn.allow_tf32 = True
    seen = []
    for name in ("encode", "generate"):
        original = getattr(tiling, name)

        def recorded(*args, original=original, name=name):
            seen.append((name, backends.tf32_disabled()))
            return original(*args)

        monkeypatch.setattr(tiling, name, recorded)
    torch.manual_seed(0)
    model = HiFiCAutoencoder(8, 8, (8, 8, 16, 16, 16), 1).eval()
    [strings] = model.compress(torch.rand(1, 3, 32, 32))
    model.decompress(*strings, 32, 32)
    assert seen == [("encode", True), ("generate", True)]
    assert torch.backends.cudnn.allow_tf32


def test_evaluation_runs_without_tf32(monkeypatch, tmp_path):
    torch.backends.cudnn.allow_tf32 = True
    seen = []

    def load_for_coding(*args):
        seen.append(backends.tf32_disabled())
        raise KeyboardInterrupt  # stop here

    monkeypatch.setattr(evaluate.zoo, "load_for_coding", load_for_coding)
    settings = evaluate.Settings(output=tmp_path / "out", device=torch.device("cpu"), metrics=("psnr",))
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate({"x": "x"}, {"kodak": []}, settings)
    assert seen == [True]
    assert torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("allowed", [True, False])
def test_training_applies_train_allow_tf32(allowed, tmp_path):
    from illm.run import start_run

    torch.backends.cudnn.allow_tf32 = not allowed
    config = load_config(
        PretrainConfig, None, [f"run.dir={tmp_path / 'run'}", f"train.allow_tf32={str(allowed).lower()}"]
    )
    start_run(config, "pretrain")
    assert torch.backends.cudnn.allow_tf32 is allowed
