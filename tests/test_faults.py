"""Faults at scale on the tiny stage 1 (issue 17): a SIGTERM to the launcher, a lost machine, a
failed checkpoint write and kills during writes each cost at most the work since the last
checkpoint, end with one line and a documented status, and a resume ends with the parameters of
an uninterrupted run."""

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from helpers.launch import CPU_ENV, accelerate_launch, free_port
from helpers.paths import REPO, TINY_CONFIGS
from helpers.synthetic import synthetic_images
from illm.checkpoint import read_checkpoint, step_checkpoints
from illm.errors import EXIT_STOPPED, EXIT_WRITE_FAILED

TINY = TINY_CONFIGS / "pretrain.toml"
SCRIPT = REPO / "scripts" / "pretrain.py"

pytestmark = pytest.mark.slow  # each test trains several tiny runs in other processes


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults") / "train"
    synthetic_images(folder, 8, (80, 96), seed=0)
    return folder


def run_args(run_dir, train_folder, *overrides):
    return [
        str(TINY),
        f"run.dir={run_dir}",
        f"data.train={train_folder}",
        "data.val=''",
        "data.batch_size=2",
        "logging.every=1",
        *overrides,
    ]


def launcher(args, processes=1, machine=None, port=None, **popen):
    """scripts/pretrain.py under `accelerate launch` (see `helpers.launch.accelerate_launch`)."""
    return accelerate_launch(SCRIPT, args, processes, machine, port, **popen)


def finish(process, timeout=600) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return process.returncode, err


def complete(args, processes=1) -> None:
    status, err = finish(launcher(args, processes))
    assert status == 0, err[-3000:]


def wait_for_events(run_dir: Path, process, minimum_bytes=2000, timeout=300) -> None:
    """Until the run has logged a few iterations (its event file grows with every log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = (
            list((run_dir / "tensorboard").glob("events.*")) if (run_dir / "tensorboard").is_dir() else []
        )
        if events and events[0].stat().st_size >= minimum_bytes:
            return
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError("the run logged nothing in time")


def final_params(run_dir: Path, step: int) -> dict:
    return read_checkpoint(run_dir / "checkpoints" / f"step_{step:08d}.pt")["models"]["autoencoder"]


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def error_lines(err: str) -> list[str]:
    """The lines our programs wrote (launchers add their own reports around them)."""
    return [line for line in err.splitlines() if line.startswith("pretrain.py:")]


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_to_the_launcher_checkpoints_the_current_iteration(tmp_path, train_folder, processes):
    steps = ["train.max_steps=40", "checkpoint.every=1000"]
    complete(run_args(tmp_path / "straight", train_folder, *steps), processes)

    run = tmp_path / "stopped"
    process = launcher(run_args(run, train_folder, *steps), processes)
    wait_for_events(run, process)
    os.kill(process.pid, signal.SIGTERM)  # the launcher, as SLURM and Kubernetes send it
    status, err = finish(process)
    assert status == 128 + signal.SIGTERM  # the launcher's own status after a SIGTERM
    stopped = error_lines(err)
    assert len(stopped) == processes and all(": stopped: SIGTERM" in line for line in stopped), err[-3000:]
    assert f"exit status {EXIT_STOPPED}" in err or processes == 1 or "75" in err
    checkpoints = step_checkpoints(run)
    assert len(checkpoints) == 1  # one checkpoint, at the iteration every process stopped after
    step = read_checkpoint(checkpoints[0])["step"]
    assert 0 < step < 40 and all(f"at iteration {step}:" in line for line in stopped)

    complete(run_args(run, train_folder, *steps), processes)  # the same command resumes
    assert_same_params(final_params(run, 40), final_params(tmp_path / "straight", 40))


def test_sigterm_to_the_training_process_exits_with_the_stopped_status(tmp_path, train_folder):
    run = tmp_path / "run"
    process = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            *run_args(run, train_folder, "train.max_steps=40", "checkpoint.every=1000"),
        ],
        env=CPU_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for_events(run, process)
    process.send_signal(signal.SIGUSR1)  # sbatch --signal sends it ahead of the time limit
    status, err = finish(process)
    assert status == EXIT_STOPPED, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("pretrain.py: stopped: SIGUSR1 at iteration")
    assert "Traceback" not in err


def test_a_lost_machine_stops_the_other_within_the_timeout_and_both_resume(tmp_path, train_folder):
    steps = ["train.max_steps=150", "checkpoint.every=5", "run.collective_timeout_s=20"]
    complete(run_args(tmp_path / "straight", train_folder, *steps), processes=2)

    run = tmp_path / "run"
    port = free_port()
    machines = [launcher(run_args(run, train_folder, *steps), 2, machine=rank, port=port) for rank in (0, 1)]
    wait_for_events(run, machines[0], minimum_bytes=6000)
    kill_machine(machines[1])
    assert not step_checkpoints(run) or read_checkpoint(step_checkpoints(run)[-1])["step"] < 150
    started = time.monotonic()
    status, err = finish(machines[0], timeout=120)
    assert time.monotonic() - started < 20 + 30  # the collective timeout, plus the launcher's teardown
    assert status != 0
    lines = error_lines(err)
    assert len(lines) == 1 and "another training process or machine stopped" in lines[0], err[-3000:]
    assert "last intact checkpoint is" in lines[0]
    machines[1].communicate()

    port = free_port()
    machines = [launcher(run_args(run, train_folder, *steps), 2, machine=rank, port=port) for rank in (0, 1)]
    for machine in machines:
        status, err = finish(machine)
        assert status == 0, err[-3000:]
    assert_same_params(final_params(run, 150), final_params(tmp_path / "straight", 150))


def kill_machine(process) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts its workers in sessions of
    their own), as when a whole machine is lost."""
    tree = psutil.Process(process.pid)
    for member in [tree, *tree.children(recursive=True)]:
        member.kill()


def test_a_failed_checkpoint_write_stops_with_one_line_and_resumes(tmp_path, train_folder):
    steps = ["train.max_steps=6", "checkpoint.every=2", "checkpoint.keep_last=5"]
    complete(run_args(tmp_path / "straight", train_folder, *steps))
    size = (tmp_path / "straight" / "checkpoints" / "step_00000002.pt").stat().st_size

    run = tmp_path / "run"
    complete(run_args(run, train_folder, *steps[1:], "train.max_steps=2"))
    intact = (run / "checkpoints" / "step_00000002.pt").read_bytes()

    def small_files():  # as a full disk would: a checkpoint cannot be written, small files can
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *run_args(run, train_folder, *steps)],
        env=CPU_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=small_files,
    )
    status, err = finish(process)
    assert status == EXIT_WRITE_FAILED, err[-3000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert (
        line.startswith("pretrain.py: error: could not write the checkpoint") and "step_00000004.pt" in line
    )
    assert "File too large" in line and "step_00000002.pt" in line
    assert (run / "checkpoints" / "step_00000002.pt").read_bytes() == intact
    assert not list((run / "checkpoints").glob(".*.tmp"))

    complete(run_args(run, train_folder, *steps))
    assert_same_params(final_params(run, 6), final_params(tmp_path / "straight", 6))


def test_kills_during_checkpoint_writes_leave_no_temporary_files(tmp_path, train_folder):
    steps = ["train.max_steps=12", "checkpoint.every=1", "checkpoint.keep_last=2"]
    complete(run_args(tmp_path / "straight", train_folder, *steps))
    run = tmp_path / "run"
    kills = 0
    for _ in range(3):
        process = launcher(run_args(run, train_folder, *steps))
        seen = {p.name for p in step_checkpoints(run)}
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            checkpoints = run / "checkpoints"
            temporary = list(checkpoints.glob(".step_*.tmp")) if checkpoints.is_dir() else []
            new = {p.name for p in step_checkpoints(run)} - seen
            if temporary or new:  # a write under way, or one just done
                kill_machine(process)
                kills += 1
                break
            time.sleep(0.002)
        process.communicate()
    assert kills >= 1
    complete(run_args(run, train_folder, *steps))
    assert not [p.name for p in run.rglob("*.tmp")]
    assert_same_params(final_params(run, 12), final_params(tmp_path / "straight", 12))
