"""The demo's guard for its output folder. The quick demo itself (every stage, wired end to end in
a few steps) runs from the installed wheel in test_wheel.py; the full demo is `make demo`."""

import torch
from PIL import Image
from skimage import data

from helpers.models import tiny_autoencoder
from illm import demo, images, zoo


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    assert demo.main(["--quick", "--output", str(tmp_path / "mine")]) == 1
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"
    assert "not made by the demo" in capsys.readouterr().err


def place_official_weights(cache):
    """Tiny autoencoders in the official file format and names, in the hub cache."""
    cache.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(demo.OFFICIAL_MODELS):
        torch.save(tiny_autoencoder(seed).state_dict(), zoo.official_path(name))


def test_jpeg_at_most_is_the_highest_quality_that_fits():
    original = images.to_float(torch.from_numpy(data.chelsea().copy()).permute(2, 0, 1))
    quality, jpeg = demo.jpeg_at_most(original, 6000)
    assert len(jpeg) <= 6000 and 1 < quality < 95
    assert len(demo.jpeg_at_most(original, 10**9)[1]) > 6000  # a larger budget buys a better JPEG
    _, above = demo.jpeg_at_most(original, len(jpeg) + 1)
    assert len(above) == len(jpeg)  # quality + 1 would not fit
    assert demo.decode_jpeg(jpeg).shape == (1, 3, 300, 451)


def test_official_models_beside_jpeg_from_the_hub_cache(offline, tmp_path, capsys):
    place_official_weights(offline)
    assert demo.main(["--official", "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    for photo in demo.HELD_OUT_PHOTOS:
        rows = [line.split() for line in out.splitlines() if line.strip().startswith(photo)]
        rows = [row for row in rows if "cannot" not in row]  # a note when JPEG cannot be that small
        assert [row[1] for row in rows][1:] == ["MS-ILLM", "No-GAN"] and rows[0][1].startswith("JPEG")
        assert float(rows[0][3]) > 0 and float(rows[1][3]) > 0  # PSNR of JPEG and of MS-ILLM
        picture = Image.open(tmp_path / "out" / f"official_{photo}.png")
        width = Image.open(tmp_path / "out" / "photos" / "held_out" / f"{photo}.png").width
        assert picture.width == 4 * width + 3 * 8  # original | JPEG | MS-ILLM | No-GAN


def test_without_official_weights_the_demo_says_how_to_get_them(offline, tmp_path, capsys):
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    note = demo.official_comparison(tmp_path, held_out, download=False)
    assert "\n" not in note and "make demo-official" in note
    assert demo.main(["--official", "--output", str(tmp_path / "out")]) == 1
    notice, error = capsys.readouterr().err.splitlines()  # the weights' licence, then the one-line error
    assert "CC-BY-NC 4.0" in notice and error.startswith("illm.demo: error: official models: ")
