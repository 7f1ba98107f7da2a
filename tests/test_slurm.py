"""scripts/slurm: the sbatch scripts' syntax and the launch command they compose (with stand-ins
for srun, scontrol and accelerate), and one stage-1 run across two "machines" on localhost giving
the same parameters as one machine with two processes."""

import os
import subprocess

import pytest
import torch

from helpers.launch import DDP_TRAIN, accelerate_launch, free_port, launch_two_processes
from helpers.paths import REPO, TINY_CONFIGS
from helpers.synthetic import synthetic_images

SLURM = REPO / "scripts" / "slurm"
TINY_PRETRAIN = TINY_CONFIGS / "pretrain.toml"

# srun stand-in: runs its command once per node, as SLURM would on each (two nodes).
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
for node in 0 1; do SLURM_NODEID=$node SLURM_NNODES=2 "$@"; done
"""
FAKE_SCONTROL = '#!/bin/bash\nprintf "node-a\\nnode-b\\n"\n'
FAKE_ACCELERATE = '#!/bin/bash\necho "$*" >> "$LAUNCH_LOG"\n'


@pytest.mark.parametrize("name", ["train.sbatch", "sweep.sbatch", "rendezvous.sh"])
def test_scripts_parse(name):
    subprocess.run(["bash", "-n", str(SLURM / name)], check=True)


def run_sbatch(tmp_path, name, *args, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("accelerate", FAKE_ACCELERATE)):
        (bin_dir / tool).write_text(text)
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "launch.log"
    environment = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "LAUNCH_LOG": str(log),
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_GPUS_ON_NODE": "4",
        **env,
    }
    subprocess.run(["bash", str(SLURM / name), *args], cwd=REPO, env=environment, check=True, timeout=60)
    return log.read_text().splitlines()


def test_train_sbatch_launches_one_run_across_the_nodes(tmp_path):
    lines = run_sbatch(tmp_path, "train.sbatch", "configs/0.14bpp.toml", "data.train=/data/train")
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        assert f"--num_machines 2 --machine_rank {rank} --num_processes 8" in line
        assert "--main_process_ip node-a --main_process_port 29500" in line
        assert line.endswith("scripts/pretrain.py configs/0.14bpp.toml data.train=/data/train")


def test_sweep_sbatch_shares_the_rendezvous_and_runs_its_own_experiment(tmp_path):
    lines = run_sbatch(
        tmp_path,
        "sweep.sbatch",
        "configs/finetune_0.14bpp.toml",
        "--sweep",
        "gan.generator_weight=0.004,0.008",
        SLURM_ARRAY_TASK_ID="1",
        SCRIPT="scripts/pretrain.py",
    )
    assert [line.split("--machine_rank ")[1][0] for line in lines] == ["0", "1"]
    assert all("--main_process_port 29501" in line and line.endswith("--sweep-index 1") for line in lines)
    assert all("scripts/pretrain.py configs/finetune_0.14bpp.toml --sweep" in line for line in lines)


@pytest.mark.slow  # four training processes
def test_two_machines_on_localhost_match_one_machine_with_two_processes(tmp_path):
    synthetic_images(tmp_path / "train", 8, (80, 96), seed=0)
    results = {}
    for mode in ("machines", "processes"):
        out = tmp_path / mode
        out.mkdir()
        args = [
            "pretrain",
            str(out),
            str(TINY_PRETRAIN),
            f"run.dir={out / 'run'}",
            f"data.train={tmp_path / 'train'}",
            "data.val=''",
            "train.max_steps=3",
            "data.batch_size=2",
            "checkpoint.every=3",
        ]
        if mode == "machines":
            port = free_port()
            machines = [accelerate_launch(DDP_TRAIN, args, 2, machine=rank, port=port) for rank in (0, 1)]
            for machine in machines:
                _, err = machine.communicate(timeout=600)
                assert machine.returncode == 0, err[-3000:]
        else:
            launch_two_processes(DDP_TRAIN, *args, timeout=600)
        ranks = [torch.load(out / f"rank{i}.pt", weights_only=True) for i in range(2)]
        assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
        results[mode] = ranks[0]["params"]
    machines, processes = results["machines"], results["processes"]
    assert machines.keys() == processes.keys()
    for name, tensor in machines.items():
        assert torch.equal(tensor, processes[name]), name


# srun stand-in for the signal test: a step that runs until SIGTERM, then "checkpoints" and exits 75.
FAKE_SRUN_STEP = """#!/bin/bash
trap 'echo "step got SIGTERM" >> "$LAUNCH_LOG"; exit 75' TERM
echo "step started" >> "$LAUNCH_LOG"
while true; do sleep 0.05; done
"""
FAKE_SCONTROL_RECORDING = """#!/bin/bash
if [ "$1" = requeue ]; then echo "scontrol $*" >> "$LAUNCH_LOG"; else printf "node-a\\nnode-b\\n"; fi
"""


@pytest.mark.parametrize("signal_name", ["USR1", "TERM"])
def test_train_sbatch_stops_the_step_on_a_signal_and_requeues_before_the_time_limit(tmp_path, signal_name):
    import signal
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, text in (("srun", FAKE_SRUN_STEP), ("scontrol", FAKE_SCONTROL_RECORDING)):
        (bin_dir / tool).write_text(text)
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "launch.log"
    environment = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "LAUNCH_LOG": str(log),
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_JOB_ID": "42",
    }
    job = subprocess.Popen(
        ["bash", str(SLURM / "train.sbatch"), "configs/0.14bpp.toml"], cwd=REPO, env=environment
    )
    deadline = time.monotonic() + 30
    while not (log.exists() and "step started" in log.read_text()):
        assert time.monotonic() < deadline and job.poll() is None
        time.sleep(0.02)
    job.send_signal(getattr(signal, f"SIG{signal_name}"))
    assert job.wait(timeout=30) == 75  # the step's status: stopped after a checkpoint
    lines = log.read_text().splitlines()
    assert "step got SIGTERM" in lines
    # Ahead of the time limit the script requeues the job itself; on preemption SLURM does.
    assert ("scontrol requeue 42" in lines) == (signal_name == "USR1")
