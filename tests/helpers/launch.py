"""Run a script under `accelerate launch` on the CPU, for the multi-process tests: as several
processes of one machine, or as one of two "machines" meeting on localhost."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from helpers.paths import REPO

DDP_TRAIN = REPO / "tests" / "helpers" / "ddp_train.py"
CPU_ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch(
    script: str | Path, args, processes: int = 1, machine: int | None = None, port: int | None = None, **popen
) -> subprocess.Popen:
    """`accelerate launch` of `script` (pipes for stdout and stderr, a session of its own): one
    process (Accelerate's simple launcher), several (torchrun, on `port` or a free one), or
    machine `machine` of two on localhost meeting at `port`."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--mixed_precision", "no"]
    command += ["--dynamo_backend", "no", "--num_processes", str(processes)]
    if machine is not None:
        command += ["--multi_gpu", "--num_machines", "2", "--machine_rank", str(machine)]
        command += [
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
            "--rdzv_backend",
            "static",
        ]
    elif processes > 1:
        command += ["--multi_gpu", "--num_machines", "1", "--main_process_port", str(port or free_port())]
    return subprocess.Popen(
        [*command, str(script), *args],
        env=CPU_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **popen,
    )


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
