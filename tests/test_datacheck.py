"""`illm data check DIR`: the training index of a folder, its unreadable files, sizes and times."""

import re

from PIL import Image

from illm.cli import main


def make_folder(root):
    (root / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (300, 200), "red").save(root / "a" / "one.png")
    Image.new("RGB", (100, 400), "blue").save(root / "a" / "b" / "two.jpg")
    (root / "a" / "broken.jpg").write_bytes(b"not an image at all")
    good = (root / "a" / "one.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "notes.txt").write_text("not listed: not an image name")
    return root


def test_data_check_reports_count_unreadable_and_sizes(tmp_path, capsys):
    root = make_folder(tmp_path / "data")
    assert main(["data", "check", str(root), "--decode", "--crop-size", "150"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"images\s+4 ", out) and re.search(r"unreadable\s+2\n", out), out
    assert "unreadable: a/broken.jpg: " in out and "unreadable: truncated.png: " in out
    assert "short side      min 100, median 150, max 200 pixels" in out
    assert re.search(r"under crop\s+1 with a side shorter than 150", out)
    assert "index time" in out


def test_header_check_is_fast_but_misses_truncated_pixels(tmp_path, capsys):
    root = make_folder(tmp_path / "data")
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "unreadable: a/broken.jpg: " in out and "truncated.png" not in out


def test_data_check_of_a_folder_without_images_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["data", "check", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("illm: error: no images") and err.count("\n") == 1
