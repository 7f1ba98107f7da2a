"""The demo's guard for its output folder. The quick demo itself (every stage, wired end to end in
a few steps) runs from the installed wheel in test_wheel.py; the full demo is `make demo`."""

from illm import demo


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    assert demo.main(["--quick", "--output", str(tmp_path / "mine")]) == 1
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"
    assert "not made by the demo" in capsys.readouterr().err
