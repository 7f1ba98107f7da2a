"""The illm command line, in process and as `python -m illm`: round trips, outputs, user errors."""

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from helpers.models import tiny_autoencoder
from helpers.paths import REPO
from illm import codec, images
from illm.cli import main


def weights(folder: Path, name: str = "weights.pt") -> list[str]:
    return ["--weights", str(folder / name)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A folder with a photo, the weights file it is coded with, and other weights."""
    folder = tmp_path_factory.mktemp("cli")
    model = tiny_autoencoder(seed=0)
    torch.save(model.state_dict(), folder / "weights.pt")
    torch.save(tiny_autoencoder(seed=1).state_dict(), folder / "other.pt")
    Image.fromarray(data.astronaut()[40:120, 150:250]).save(folder / "astronaut.png")  # 80 x 100
    return folder, model


@pytest.fixture(scope="module")
def compressed(setup) -> Path:
    folder, _ = setup
    assert main(["compress", *weights(folder), str(folder / "astronaut.png"), "--device", "cpu"]) == 0
    return folder / "astronaut.illm"


def run_failing(argv, capsys) -> str:
    """Run the CLI expecting a user error; return its one-line message."""
    assert main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("illm: error: "), captured.err
    return lines[0]


def test_compressed_file_is_framing_plus_the_two_strings(setup, compressed):
    folder, model = setup
    image = images.to_float(images.read_image(folder / "astronaut.png"))
    ((latent_string, hyper_string),) = model.compress(image)
    assert compressed.stat().st_size == codec.FRAMING_BYTES + len(latent_string) + len(hyper_string)
    assert compressed.read_bytes() == codec.compress(model, image)


def test_decompressed_png_equals_the_in_memory_decoding(setup, compressed, tmp_path):
    _, model = setup
    weights = str(setup[0] / "weights.pt")
    assert main(["decompress", "--weights", weights, str(compressed), "-o", str(tmp_path / "out.png")]) == 0
    expected = images.to_uint8(codec.decompress(model, compressed.read_bytes()))
    assert torch.equal(images.read_image(tmp_path / "out.png"), expected)
    assert expected.shape == (3, 80, 100)


def test_info(setup, compressed, capsys):
    _, model = setup
    assert main(["info", str(compressed)]) == 0
    out = capsys.readouterr().out
    size = compressed.stat().st_size
    assert codec.weights_id(model).hex() in out
    assert "100x80" in out and f"{size:,} bytes" in out and f"{8 * size / 8000:.4f} bpp" in out
    assert "header          15 bytes" in out and "format version  1" in out


def test_summary_line(setup, tmp_path, capsys):
    folder, _ = setup
    main(["compress", *weights(folder), str(folder / "astronaut.png"), "-o", str(tmp_path / "a.illm")])
    out = capsys.readouterr().out.strip()
    size = (tmp_path / "a.illm").stat().st_size
    assert out.startswith(f"compressed 1 file: {size:,} bytes, {8 * size / 8000:.4f} bpp, ")
    assert "weights loaded in" in out


@pytest.mark.slow  # fresh interpreters
def test_python_dash_m_round_trip(setup, tmp_path):
    folder, model = setup
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "illm", "compress", *weights(folder), str(folder / "astronaut.png")]
    command += ["-o", str(tmp_path / "x.illm"), "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("compressed 1 file: ")
    header = codec.read_header((tmp_path / "x.illm").read_bytes())
    assert (header.height, header.width, header.weights_id) == (80, 100, codec.weights_id(model))
    assert (
        main(["decompress", *weights(folder), str(tmp_path / "x.illm"), "-o", str(tmp_path / "x.png")]) == 0
    )
    expected = images.to_uint8(codec.decompress(model, (tmp_path / "x.illm").read_bytes()))
    assert torch.equal(images.read_image(tmp_path / "x.png"), expected)


@pytest.mark.slow  # fresh interpreters
def test_python_dash_m_user_error(tmp_path):
    (tmp_path / "bad.illm").write_bytes(b"hello")
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "illm", "info", str(tmp_path / "bad.illm")]
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    assert result.returncode == 1
    expected = f"illm: error: {tmp_path / 'bad.illm'}: not an .illm file: it starts with 68656c6c, not the magic 8949"
    assert result.stderr.strip().splitlines() == [expected]


def test_several_inputs_go_into_a_new_folder(setup, tmp_path):
    folder, _ = setup
    pixels = data.chelsea()[:40, :56]
    write_png16(tmp_path / "deep.png", pixels.astype(np.uint16) * 257)
    Image.fromarray(pixels).convert("L").save(tmp_path / "gray.jpg")
    inputs = [str(tmp_path / "deep.png"), str(tmp_path / "gray.jpg")]
    assert main(["compress", *weights(folder), *inputs, "-o", str(tmp_path / "out" / "nested")]) == 0
    written = sorted((tmp_path / "out" / "nested").iterdir())
    assert [path.name for path in written] == ["deep.illm", "gray.illm"]  # no temporary files left
    assert main(["decompress", *weights(folder), *map(str, written), "-o", str(tmp_path / "png")]) == 0
    assert images.read_image(tmp_path / "png" / "deep.png").shape == (3, 40, 56)


def test_rgba_input_warns_in_one_line(setup, tmp_path, capsys):
    folder, _ = setup
    rgba = np.concatenate([data.chelsea()[:30, :40], np.full((30, 40, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert main(["compress", *weights(folder), str(tmp_path / "rgba.png")]) == 0
    expected = f"illm: warning: {tmp_path / 'rgba.png'}: alpha channel dropped (the codec stores RGB only)"
    assert capsys.readouterr().err.strip() == expected
    assert codec.read_header((tmp_path / "rgba.illm").read_bytes()).height == 30


def test_existing_output_needs_force(setup, compressed, tmp_path, capsys):
    folder, _ = setup
    target = tmp_path / "astronaut.illm"
    target.write_bytes(b"keep me")
    argv = ["compress", *weights(folder), str(folder / "astronaut.png"), "-o", str(tmp_path) + "/"]
    assert "already exists (use --force to overwrite)" in run_failing(argv, capsys)
    assert target.read_bytes() == b"keep me"
    assert main([*argv, "--force"]) == 0
    assert target.read_bytes() == compressed.read_bytes()


def forged(good: bytes, height: int, width: int) -> bytes:
    """``good`` with another image size in its header, and a valid CRC."""
    body = good[:7] + struct.pack(">HH", height, width) + good[11:-4]
    return body + struct.pack(">I", zlib.crc32(body))


@pytest.mark.parametrize(
    "case, message",
    [
        ("truncated", "truncated"),
        ("flipped payload byte", "checksum mismatch"),
        ("absurd size", "image size 60000x100 is out of range"),
        ("wrong magic", "not an .illm file"),
        ("png", "not an .illm file"),
        ("other weights", "compressed with weights"),
    ],
)
def test_bad_illm_files_fail_in_one_line(setup, compressed, tmp_path, capsys, case, message):
    folder, _ = setup
    good = compressed.read_bytes()
    content = {
        "truncated": good[:-7],
        "flipped payload byte": good[:30] + bytes([good[30] ^ 1]) + good[31:],
        "absurd size": forged(good, 60000, 100),
        "wrong magic": b"XX" + good[2:],
        "png": (folder / "astronaut.png").read_bytes(),
        "other weights": good,
    }[case]
    bad = tmp_path / "bad.illm"
    bad.write_bytes(content)
    decoder = weights(folder, "other.pt" if case == "other weights" else "weights.pt")
    line = run_failing(["decompress", *decoder, str(bad), "-o", str(tmp_path / "out.png")], capsys)
    assert line.startswith(f"illm: error: {bad}: ") and message in line
    assert not (tmp_path / "out.png").exists()
    if case != "other weights":
        assert message in run_failing(["info", str(bad)], capsys)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ("{weights} {here}/notes.png", "notes.png: not an image file"),
        ("{weights} {here}/absent.png", "absent.png: no such file"),
        ("msillm_quality7 {here}/astronaut.png -o {here}/q.illm", "did you mean 'msillm_quality_6'"),
        ("{here}/notes.png {here}/astronaut.png -o {here}/q.illm", "not a PyTorch state dict"),
        ("{weights} {here}/astronaut.png {here}/notes.png -o {here}/notes.png", "must be a folder"),
    ],
)
def test_user_errors_fail_in_one_line(setup, tmp_path, capsys, arguments, message):
    folder, _ = setup
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "astronaut.png").write_bytes((folder / "astronaut.png").read_bytes())
    argv = ["compress", "--weights", *arguments.format(weights=folder / "weights.pt", here=tmp_path).split()]
    assert message in run_failing(argv, capsys)


def test_cuda_unavailable_is_a_user_error(setup, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    folder, _ = setup
    argv = ["compress", *weights(folder), str(folder / "astronaut.png"), "--device", "cuda"]
    assert "CUDA is not available" in run_failing(argv, capsys)


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compress", "image.png"])  # no --weights
    assert exit_.value.code == 2
    assert "--weights" in capsys.readouterr().err


def write_png16(path: Path, rgb: np.ndarray) -> None:
    """A 16-bit RGB PNG (Pillow cannot write one)."""
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb)

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", rgb.shape[1], rgb.shape[0], 16, 2, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
