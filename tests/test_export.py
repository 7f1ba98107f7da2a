"""scripts/export.py: training runs become plain weights files in the official formats."""

import pytest
import torch

from helpers.paths import TINY_CONFIGS
from helpers.synthetic import synthetic_images
from illm import codec, zoo
from illm.config import load_config
from illm.experiment import PretrainConfig, VQVAEConfig
from illm.export import export
from illm.export import main as export_main
from illm.stages import pretrain, vqvae


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    synthetic_images(root / "train", 4, (64, 64), seed=0)
    common = [f"data.train={root / 'train'}", "data.val=''", "train.max_steps=1", "checkpoint.every=1"]
    pretrain.train(
        load_config(PretrainConfig, TINY_CONFIGS / "pretrain.toml", [f"run.dir={root / 'ae'}", *common])
    )
    vqvae.train(load_config(VQVAEConfig, TINY_CONFIGS / "vqvae.toml", [f"run.dir={root / 'vq'}", *common]))
    return root


def test_autoencoder_export_is_a_plain_updated_state_dict(runs, tmp_path):
    kind, _ = export(runs / "ae", tmp_path / "ae.pt")
    state = torch.load(tmp_path / "ae.pt", weights_only=True)
    assert kind == "autoencoder" and all(isinstance(v, torch.Tensor) for v in state.values())
    assert state["latent_bottleneck._quantized_cdf"].numel() > 0  # update() ran: coder tables built
    model = zoo.load(str(tmp_path / "ae.pt"))
    image = torch.rand(1, 3, 70, 90)
    assert codec.decompress(model, codec.compress(model, image)).shape == image.shape


def test_vqvae_export_loads_as_a_labeller(runs, tmp_path):
    kind, _ = export(runs / "vq", tmp_path / "vq.pt")
    labeller = zoo.load(str(tmp_path / "vq.pt"), kind="vqvae")
    assert kind == "vqvae"
    labels = labeller.labels(torch.rand(2, 3, 64, 96))
    assert labels.shape == (2, 8, 12) and labels.dtype == torch.int64
    assert 0 <= labels.min() and labels.max() < labeller.num_codes


def test_export_errors_are_one_line(runs, tmp_path, capsys):
    for arguments, message in [
        ([str(tmp_path / "nothing")], "nothing"),
        ([str(runs / "vq"), "--kind", "autoencoder"], "holds no autoencoder"),
        ([str(runs / "ae"), "--checkpoint", "best"], "no checkpoints/best.pt yet"),
        ([str(runs / "ae"), "--checkpoint", "7"], "no checkpoint of step 7 (kept steps: 1)"),
        ([str(runs / "ae"), "--checkpoint", "first"], "expected best, latest or a step number, got 'first'"),
    ]:
        status = export_main([*arguments, "-o", str(tmp_path / "x.pt")])
        err = capsys.readouterr().err
        assert status == 1 and len(err.strip().splitlines()) == 1 and err.startswith("export.py: error: ")
        assert message in err, err
    assert not (tmp_path / "x.pt").exists()


def test_checkpoint_picks_best_latest_or_a_step(runs, tmp_path, capsys):
    kept = tmp_path / "run" / "checkpoints"
    kept.mkdir(parents=True)
    original = (runs / "ae" / "checkpoints" / "step_00000001.pt").read_bytes()
    for name in ("step_00000010.pt", "step_00000020.pt", "best.pt"):
        (kept / name).write_bytes(original)
    for which, expected in [("latest", "step_00000020.pt"), ("best", "best.pt"), ("10", "step_00000010.pt")]:
        _, path = export(tmp_path / "run", tmp_path / f"{which}.pt", checkpoint=which)
        assert path == kept / expected
    assert export_main([str(tmp_path / "run"), "--checkpoint", "best", "-o", str(tmp_path / "b.pt")]) == 0
    assert f"{kept / 'best.pt'}" in capsys.readouterr().out
    assert isinstance(zoo.load(str(tmp_path / "b.pt")), torch.nn.Module)
