"""scripts/gpu_check.sh skips in one line without CUDA; its checks run on a CPU in quick mode."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers.paths import REPO


@pytest.mark.skipif(
    torch.cuda.is_available() or shutil.which("nvidia-smi") is not None, reason="a GPU is here"
)
def test_without_cuda_the_check_skips_in_one_line(tmp_path):
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and result.stdout.startswith("gpu_check: skipped: ")
    assert result.stderr == ""
    assert "skipped" in (tmp_path / "out" / "summary.md").read_text()


def test_an_unknown_check_is_a_one_line_usage_error(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), str(tmp_path), "--only", "nonsense"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "unknown check 'nonsense'" in result.stderr


@pytest.mark.slow  # every check in a child process, tiny stand-ins for the full-size ones: minutes on two cores
def test_every_check_passes_on_a_cpu_in_quick_mode(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "scripts" / "gpu_check.py"), str(tmp_path), "--device", "cpu"]
    result = subprocess.run(
        [*command, "--quick", "--budget", "1500"], env=env, capture_output=True, text=True
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    statuses = {name: check["status"] for name, check in summary["checks"].items()}
    assert result.returncode == 0, (statuses, (tmp_path / "log.txt").read_text()[-3000:])
    assert statuses == {
        "environment": "pass",
        "codec_reference": "pass",
        "coder_tables": "pass",
        "stage1_validation": "pass",
        "tiny_stages_bf16_resume": "pass",
        "ddp_world1": "pass",
        "ddp_world2": "skip",
        "fp16": "pass",
        "tf32_latent": "pass",
        "stage1_timing": "pass",
        "stage2_timing": "pass",
    }
    checks = summary["checks"]
    assert checks["codec_reference"]["figures"]["fp32_encode_bytes_equal_cpu"] is True
    assert checks["ddp_world1"]["figures"]["grad_stride_warnings"] == 0
    assert checks["stage1_validation"]["figures"]["checkpoint_steps"] == [2]
    assert set(checks["stage1_timing"]["figures"]) == {
        f"{precision}_benchmark_{state}" for precision in ("fp32", "bf16") for state in ("off", "on")
    }
    markdown = (tmp_path / "summary.md").read_text()
    assert all(f"| {name} | {status.upper()} |" in markdown for name, status in statuses.items())
