"""Sweeps: one experiment per value of a config key, or per combination of several keys' values.
Every stage script takes them (train_vqvae.py, pretrain.py, finetune_gan.py), with one syntax:

    accelerate launch scripts/finetune_gan.py configs/finetune_0.14bpp.toml data.train=DIR \\
        --sweep gan.generator_weight=0.004,0.008,0.016 [--sweep distortion.lam=1,2] [--sweep-index N]

Values are parsed like overrides (TOML, else a plain string); commas inside brackets or quotes
do not split (`--sweep discriminator.channels=[64,128,128,256],[128,128,256,256]`). Several
`--sweep` flags give the cross product, in the order given (the last key varies fastest). Each
experiment runs in its own folder `<run.dir>/<key>=<value>` (keys joined by `,`; characters
other than letters, digits and `._=+-` become `_`) and in a Python process of its own, one
after another, and a summary follows. `--sweep-index N` runs only experiment N (0-based), in
this process: one SLURM array task each.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed

from illm.config import load_config, parse_override
from illm.entry import exit_on_failure, parse_args, run_main
from illm.errors import ConfigError, IllmError

SWEEP_FLAG = "--sweep"
INDEX_FLAG = "--sweep-index"
USAGE_LINE = f"       [{SWEEP_FLAG} section.key=v1,v2,... ...] [{INDEX_FLAG} N]"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")


@dataclass
class Sweep:
    """One swept key and the value texts given for it."""

    key: str
    values: list[str]


@dataclass
class Experiment:
    """One point of a sweep: its overrides (`key=value` texts) and its run-folder name."""

    index: int
    overrides: list[str]
    name: str


def split_values(text: str) -> list[str]:
    """Split at the commas that are outside brackets, braces and quotes."""
    values, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return [v.strip() for v in values]


def parse_sweep(text: str) -> Sweep:
    """`section.key=v1,v2,...` -> Sweep (each value must parse as an override)."""
    if "=" not in text:
        raise ConfigError(f"{SWEEP_FLAG} '{text}': expected section.key=v1,v2,...")
    key, raw = text.split("=", 1)
    key = key.strip()
    values = split_values(raw)
    if not raw.strip() or any(not v for v in values):
        raise ConfigError(f"{SWEEP_FLAG} '{text}': empty value in the list")
    for value in values:
        parse_override(f"{key}={value}")  # the key's shape; its existence is checked with the config
    if key == "run.dir":
        raise ConfigError(
            f"{SWEEP_FLAG} '{text}': run.dir cannot be swept (each value gets its own folder inside it)"
        )
    return Sweep(key, values)


def experiments(sweeps: list[Sweep]) -> list[Experiment]:
    """The cross product of the sweeps, each with its folder name."""
    keys = [s.key for s in sweeps]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{SWEEP_FLAG}: a key is swept twice ({', '.join(keys)})")
    points = []
    for index, values in enumerate(itertools.product(*(s.values for s in sweeps))):
        assignments = [f"{key}={value}" for key, value in zip(keys, values)]
        points.append(Experiment(index, assignments, ",".join(_UNSAFE.sub("_", a) for a in assignments)))
    names = [p.name for p in points]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ConfigError(
            f"{SWEEP_FLAG}: several values share the run folder '{clashes[0]}' once sanitised; give "
            "distinct values"
        )
    return points


def split_sweep_args(argv: list[str]) -> tuple[list[str], list[Sweep], int | None]:
    """Take `--sweep X` / `--sweep=X` and `--sweep-index N` out of argv."""
    rest, sweeps, index = [], [], None
    args = iter(argv)
    for arg in args:
        flag, _, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if flag not in (SWEEP_FLAG, INDEX_FLAG):
            rest.append(arg)
            continue
        value = inline or next(args, None)
        if value is None:
            raise ConfigError(f"{flag} needs a value")
        if flag == SWEEP_FLAG:
            sweeps.append(parse_sweep(value))
        else:
            try:
                index = int(value)
            except ValueError:
                raise ConfigError(f"{INDEX_FLAG}: expected an integer, got '{value}'") from None
    return rest, sweeps, index


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def stage_cli(program: str, main: Callable[[list[str]], None], config_cls, usage: str, argv=None) -> None:
    """A stage script's entry point: one run, or one per `--sweep` experiment; exits on failure."""
    exit_on_failure(run_main(program, lambda args: run_with_sweeps(main, config_cls, args, usage), argv))


def run_with_sweeps(
    main: Callable[[list[str]], None],
    config_cls,
    argv: list[str],
    usage: str,
    run_experiment: Callable[[list[str]], None] | None = None,
) -> None:
    """`main(argv)` once, or once per sweep experiment (all configs are checked before any runs).

    With `--sweep-index` the one experiment runs in this process; otherwise each experiment runs
    in a process of its own (`run_experiment`, default `in_own_process(main)`), one after another.
    `run_experiment(argv)` raises `IllmError` when the experiment fails.
    """
    argv, sweeps, index = split_sweep_args(argv)
    if not sweeps:
        if index is not None:
            raise ConfigError(f"{INDEX_FLAG} needs at least one {SWEEP_FLAG}")
        main(argv)
        return
    config_path, overrides = parse_args(argv, usage, config_cls)
    base_dir = Path(load_config(config_cls, config_path, overrides).run.dir)
    points = experiments(sweeps)
    if index is not None:
        if not 0 <= index < len(points):
            raise ConfigError(
                f"{INDEX_FLAG} {index}: the sweep has {len(points)} experiments (0 to {len(points) - 1})"
            )
        points, run_experiment = [points[index]], main
    runs = []
    for point in points:
        run_dir = base_dir / point.name
        point_argv = [config_path, *overrides, *point.overrides, f"run.dir={json.dumps(str(run_dir))}"]
        load_config(config_cls, config_path, point_argv[1:])  # fail before anything trains
        runs.append((point, run_dir, point_argv))

    run_experiment = run_experiment or in_own_process(main)
    results = []
    for point, run_dir, point_argv in runs:
        if _is_main_process():
            overrides_text = " ".join(point.overrides)
            print(
                f"[sweep] experiment {point.index} ({len(results) + 1}/{len(runs)}): {overrides_text} -> "
                f"{run_dir}",
                flush=True,
            )
        started = time.perf_counter()
        try:
            run_experiment(point_argv)
            status = "done"
        except IllmError as error:
            status = f"failed: {error}"
        results.append((point, run_dir, status, time.perf_counter() - started))
    if index is None and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # the one the experiments' ports were agreed on
    if _is_main_process():
        print(summary(results))
    failed = sum(status != "done" for *_, status, _ in results)
    if failed:
        raise IllmError(f"{failed} of {len(results)} sweep experiments failed (see the summary above)")


# The child: `python -c CHILD PROGRAM MODULE FUNCTION ARGS...` runs MODULE.FUNCTION(ARGS) as PROGRAM.
_CHILD = (
    "import importlib, sys; from illm.entry import run_main; "
    "sys.exit(run_main(sys.argv[1], getattr(importlib.import_module(sys.argv[2]), sys.argv[3]), sys.argv[4:]))"
)


def in_own_process(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """Run each experiment as `main(argv)` in a fresh Python process.

    A fresh process starts with fresh Accelerate state, a fresh process group and fresh globals.
    Under a multi-process launch every process starts its own child, and the children form a
    process group of their own on a port the main process picks free for each experiment (the
    launcher's rendezvous serves one process group only).
    """

    def run(argv: list[str]) -> None:
        env = dict(os.environ)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            env.update(MASTER_PORT=str(_agree_on_a_free_port()), TORCHELASTIC_USE_AGENT_STORE="False")
        program = Path(sys.argv[0]).name or "sweep"
        command = [sys.executable, "-c", _CHILD, program, main.__module__, main.__name__, *argv]
        returncode = subprocess.run(command, env=env).returncode
        if returncode != 0:
            raise IllmError(f"exit code {returncode}")

    return run


def _agree_on_a_free_port() -> int:
    """A port free on the main process's machine, the same in every process of the launch."""
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")  # the launcher's rendezvous, used for this only
    port = [None]
    if torch.distributed.get_rank() == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("", 0))
            port = [probe.getsockname()[1]]
    torch.distributed.broadcast_object_list(port, src=0)
    return port[0]


def summary(results) -> str:
    lines = ["[sweep] summary:"]
    for point, run_dir, status, seconds in results:
        lines.append(
            f"  {point.index:3d}  {' '.join(point.overrides):40s}  {status:8s}  {seconds:8.1f} s  {run_dir}"
        )
    return "\n".join(lines)
