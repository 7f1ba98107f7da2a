"""The demo's pieces, wired end to end in a few steps per stage (the full demo is `make demo`)."""

import csv

import pytest

from illm import demo


@pytest.mark.slow
def test_quick_demo_makes_everything_it_announces(tmp_path, offline, capsys):
    output = tmp_path / "demo"
    assert demo.main(["--quick", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    for made in ["results/results.csv", "results/per_image.csv", "results/rd_held_out.png", "chelsea.illm", "side_by_side.png", "stage1.pt", "stage2.pt"]:
        assert (output / made).exists(), made
        assert str(output / made) in printed or made.startswith("results/"), made
    for stage in ("vqvae", "pretrain", "finetune"):
        assert list((output / "runs" / stage / "tensorboard").iterdir()), stage
    rows = list(csv.DictReader((output / "results" / "results.csv").open()))
    assert [r["model"] for r in rows] == ["stage1", "stage2"]
    assert all(float(r["psnr"]) > 0 and float(r["bpp"]) > 0 for r in rows)
    assert all(r["lpips"] == "" for r in rows)  # backbone weights missing offline: reported, not fatal


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    assert demo.main(["--quick", "--output", str(tmp_path / "mine")]) == 1
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"
    assert "not made by the demo" in capsys.readouterr().err
