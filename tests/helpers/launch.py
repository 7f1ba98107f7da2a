"""Run a script as two CPU processes under `accelerate launch`, for the multi-process tests."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from helpers.paths import REPO

DDP_TRAIN = REPO / "tests" / "helpers" / "ddp_train.py"


def launch_two_processes(script: str | Path, *args: str, timeout: float = 300) -> str:
    """`accelerate launch` on two CPU processes (gloo); returns stdout, fails the test on an error.

    The processes meet on a port that Accelerate picks free (`--main_process_port 0`), so tests
    running at the same time never collide; on timeout the whole process group is killed.
    """
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        str(script),
        *args,
    ]
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    assert process.returncode == 0, err[-3000:]
    return out
