"""One entry-point convention: `<program>: error: ...` and status 1 everywhere, the training
scripts' --help and --print-config, and the CLI's torch-free answers."""

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from helpers.paths import REPO, TINY_CONFIGS
from illm import entry, evaluate, export, fileformat
from illm.config import load_config
from illm.experiment import PretrainConfig
from illm.stages import finetune, pretrain, vqvae


def test_run_main_turns_user_errors_into_one_line(capsys):
    def user_error(argv):
        from illm.errors import ConfigError

        raise ConfigError(f"key 'x': bad\n  value {argv[0]}")

    def missing_file(argv):
        open(argv[0])

    def interrupted(argv):
        raise KeyboardInterrupt

    assert entry.run_main("prog", user_error, ["7"]) == 1
    assert capsys.readouterr().err == "prog: error: key 'x': bad value 7\n"
    assert entry.run_main("prog", missing_file, ["/no/such/file"]) == 1
    assert capsys.readouterr().err == "prog: error: /no/such/file: No such file or directory\n"
    assert entry.run_main("prog", interrupted, []) == 130
    assert capsys.readouterr().err == "prog: interrupted\n"
    assert entry.run_main("prog", lambda argv: None, []) == 0
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        entry.run_main("prog", lambda argv: 1 / 0, [])


@pytest.mark.parametrize(
    "run, program",
    [
        (lambda argv: pretrain.cli(argv), "pretrain.py"),
        (lambda argv: vqvae.cli(argv), "train_vqvae.py"),
        (lambda argv: finetune.cli(argv), "finetune_gan.py"),
    ],
)
def test_training_scripts_share_the_prefix(run, program, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run([str(REPO / "missing.toml")])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith(f"{program}: error: ")


def test_export_and_evaluate_share_the_prefix(tmp_path, capsys):
    assert export.main([str(tmp_path / "none"), "-o", str(tmp_path / "w.pt")]) == 1
    assert capsys.readouterr().err.startswith("export.py: error: ")
    assert evaluate.main(["--weights", "w.pt", "--data", "kodak"]) == 1
    assert capsys.readouterr().err.startswith("evaluate.py: error: ")


def test_training_help_lists_the_sections_and_the_reference(capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.cli(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for section in ("run", "data", "model", "optim", "rate", "checkpoint"):
        assert f"\n  {section} " in out, section
    assert "The rate loss: target bitrate" in out and "Config reference" in out and "--print-config" in out


def test_print_config_prints_the_resolved_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.cli([str(TINY_CONFIGS / "pretrain.toml"), "--print-config", "optim.lr=0.0005"])
    assert exit_info.value.code == 0
    (tmp_path / "printed.toml").write_text(capsys.readouterr().out)
    printed = load_config(PretrainConfig, tmp_path / "printed.toml")
    assert printed == load_config(PretrainConfig, TINY_CONFIGS / "pretrain.toml", ["optim.lr=0.0005"])
    assert printed.optim.lr == 0.0005


def test_print_config_reports_a_bad_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.cli([str(TINY_CONFIGS / "pretrain.toml"), "--print-config", "optim.lrr=1"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith("pretrain.py: error: ")


def write_illm_file(path: Path, height: int, width: int) -> Path:
    """A well-framed .illm file (its payload is not decodable; `info` reads only the framing)."""
    body = fileformat.HEADER.pack(fileformat.MAGIC, fileformat.VERSION, b"\x01\x02\x03\x04", height, width)
    body += bytes(16)
    path.write_bytes(body + fileformat.CRC.pack(zlib.crc32(body)))
    return path


@pytest.mark.slow  # fresh interpreters
def test_help_version_list_and_info_do_not_import_torch(tmp_path):
    file = write_illm_file(tmp_path / "x.illm", height=30, width=40)
    code = (
        "import atexit, sys; "
        "atexit.register(lambda: print('torch imported:', 'torch' in sys.modules)); "
        "from illm.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    for argv, expected in [
        (["--version"], "illm 0.1.0"),
        (["list"], "msillm_quality_3"),
        (["info", str(file)], "40x30 (width x height)"),
        (["--help"], "usage: illm"),
        (["compress", "--help"], "--weights"),
    ]:
        result = subprocess.run(
            [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=environment, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert expected in result.stdout and result.stdout.endswith("torch imported: False\n"), argv
