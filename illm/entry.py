"""How every program of the project starts and fails: one convention, and no torch import here.

`run_main(program, main, argv)` runs ``main(argv)`` and turns a user error (`IllmError`, or an
`OSError` about a file) into one line ``<program>: error: ...`` on stderr and its exit status
(1, or the training statuses of `illm.errors`: 69, 74, 75), and
Ctrl-C into ``<program>: interrupted`` and status 130. Anything else is a bug and keeps its
traceback. It is used by ``illm``, the training scripts, ``export.py``, ``evaluate.py`` and the demo.

`parse_args` is the training scripts' command line: ``CONFIG.toml [section.key=value ...]``, with
``--help`` (the config sections, and where their keys are documented) and ``--print-config``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from illm.errors import IllmError

CONFIG_REFERENCE = "README.md, section 'Config reference'"
PRINT_CONFIG_FLAG = "--print-config"


def run_main(program: str, main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Run ``main(argv)`` (default ``sys.argv[1:]``); return the exit status: main's (None is 0),
    the error's status after a one-line user error (1 for most), 130 after Ctrl-C."""
    try:
        return main(sys.argv[1:] if argv is None else argv) or 0
    except IllmError as error:
        return fail(program, str(error), error.kind, error.exit_code)
    except OSError as error:
        return fail(program, f"{error.filename}: {error.strerror}" if error.filename else str(error))
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return 130


def fail(program: str, message: str, kind: str = "error", status: int = 1) -> int:
    """Print ``<program>: <kind>: message`` on one line; return the exit status."""
    print(f"{program}: {kind}: {' '.join(message.split())}", file=sys.stderr)
    return status


def exit_on_failure(status: int) -> None:
    """For entry points called as functions: return on success, else leave with ``status``."""
    if status:
        sys.exit(status)


def parse_args(argv: list[str], usage: str, config_cls) -> tuple[str, list[str]]:
    """``CONFIG.toml [section.key=value ...]``: the config path and the overrides.

    ``--help`` prints ``usage`` and the config sections of ``config_cls``; ``--print-config``
    (anywhere) prints the resolved config as TOML. Both then exit with status 0.
    """
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text(usage, config_cls) if argv else usage, file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    print_config = PRINT_CONFIG_FLAG in argv
    argv = [arg for arg in argv if arg != PRINT_CONFIG_FLAG]
    path, overrides = argv[0], argv[1:]
    if path.startswith("-"):
        raise IllmError(f"unknown option '{path}' (see --help)")
    if "=" in path:
        raise IllmError(f"the first argument must be a config file, got '{path}'")
    if print_config:
        from illm.config import load_config, to_toml

        print(to_toml(load_config(config_cls, path, overrides)), end="")
        sys.exit(0)
    return path, overrides


def help_text(usage: str, config_cls) -> str:
    """The usage, the config sections with their one-line docs, and where the keys are documented."""
    import dataclasses

    defaults = config_cls()
    sections = [
        (f.name, (type(getattr(defaults, f.name)).__doc__ or "").strip())
        for f in dataclasses.fields(config_cls)
    ]
    width = max(len(name) for name, _ in sections)
    lines = [
        usage,
        "",
        (config_cls.__doc__ or "").strip().splitlines()[0],
        "",
        "CONFIG.toml is a config file (configs/ holds the released ones); each section.key=value",
        "overrides one key, its value in TOML (numbers, true/false, [lists], strings).",
        "",
        "config sections:",
        *(f"  {name:<{width}}  {doc}" for name, doc in sections),
        "",
        "options:",
        "  -h, --help        show this help and exit",
        f"  {PRINT_CONFIG_FLAG}    print the resolved config (file and overrides) as TOML and exit",
        "  --sweep section.key=v1,v2,...",
        "                    one experiment per value, each in run.dir/<key>=<value> (repeatable:",
        "                    the cross product); see illm/sweep.py",
        "  --sweep-index N   run only experiment N of the sweep (one SLURM array task each)",
        "",
        f"Every key, its default and meaning: {CONFIG_REFERENCE}.",
    ]
    return "\n".join(lines)
