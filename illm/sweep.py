"""Sweeps: one experiment per value of a config key, or per combination of several keys' values.

    accelerate launch scripts/finetune_gan.py configs/finetune_0.14bpp.toml data.train=DIR \\
        --sweep gan.generator_weight=0.004,0.008,0.016 [--sweep distortion.lam=1,2] [--sweep-index N]

Values are parsed like overrides (TOML, else a plain string); commas inside brackets or quotes
do not split (`--sweep discriminator.channels=[64,128,128,256],[128,128,256,256]`). Several
`--sweep` flags give the cross product, in the order given (the last key varies fastest). Each
experiment runs in its own folder `<run.dir>/<key>=<value>` (keys joined by `,`; characters
other than letters, digits and `._=+-` become `_`), one after another in this process, and a
summary follows. `--sweep-index N` runs only experiment N (0-based): one SLURM array task each.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.state import AcceleratorState

from illm.config import load_config, parse_override
from illm.errors import ConfigError, IllmError
from illm.training import parse_args

SWEEP_FLAG = "--sweep"
INDEX_FLAG = "--sweep-index"
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
        raise ConfigError(f"{SWEEP_FLAG} '{text}': run.dir cannot be swept (each value gets its own folder inside it)")
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
        raise ConfigError(f"{SWEEP_FLAG}: several values share the run folder '{clashes[0]}' once sanitised; give distinct values")
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


def run_with_sweeps(main: Callable[[list[str]], None], config_cls, argv: list[str], usage: str) -> None:
    """`main(argv)` once, or once per sweep experiment (all configs are checked before any runs)."""
    argv, sweeps, index = split_sweep_args(argv)
    if not sweeps:
        if index is not None:
            raise ConfigError(f"{INDEX_FLAG} needs at least one {SWEEP_FLAG}")
        main(argv)
        return
    config_path, overrides = parse_args(argv, usage)
    base_dir = Path(load_config(config_cls, config_path, overrides).run.dir)
    points = experiments(sweeps)
    if index is not None:
        if not 0 <= index < len(points):
            raise ConfigError(f"{INDEX_FLAG} {index}: the sweep has {len(points)} experiments (0 to {len(points) - 1})")
        points = [points[index]]
    runs = []
    for point in points:
        run_dir = base_dir / point.name
        point_argv = [config_path, *overrides, *point.overrides, f"run.dir={json.dumps(str(run_dir))}"]
        load_config(config_cls, config_path, point_argv[1:])  # fail before anything trains
        runs.append((point, run_dir, point_argv))

    results = []
    with process_group_kept():
        for point, run_dir, point_argv in runs:
            if _is_main_process():
                print(f"[sweep] experiment {point.index} ({len(results) + 1}/{len(runs)}): {' '.join(point.overrides)} -> {run_dir}", flush=True)
            started = time.perf_counter()
            try:
                main(point_argv)
                status = "done"
            except IllmError as error:
                status = f"failed: {error}"
            results.append((point, run_dir, status, time.perf_counter() - started))
    if _is_main_process():
        print(summary(results))
    failed = sum(status != "done" for *_, status, _ in results)
    if failed:
        raise IllmError(f"{failed} of {len(results)} sweep experiments failed (see the summary above)")


@contextmanager
def process_group_kept():
    """Keep the distributed process group up until the last experiment has run.

    Every stage ends with `accelerator.end_training()`, which destroys the process group, and a
    new one cannot be set up inside the same `accelerate launch` (its workers share the
    launcher's rendezvous store): within a sweep that teardown waits for the end.
    """
    destroy = AcceleratorState.destroy_process_group
    AcceleratorState.destroy_process_group = lambda self, group=None: None
    try:
        yield
    finally:
        AcceleratorState.destroy_process_group = destroy
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def summary(results) -> str:
    lines = ["[sweep] summary:"]
    for point, run_dir, status, seconds in results:
        lines.append(f"  {point.index:3d}  {' '.join(point.overrides):40s}  {status:8s}  {seconds:8.1f} s  {run_dir}")
    return "\n".join(lines)
