"""Stand-in stage `main`s for the sweep tests, importable by the child processes of a sweep."""

import os
from pathlib import Path

from illm.errors import IllmError


def write_pid(argv: list[str]) -> None:
    Path(argv[0]).write_text(str(os.getpid()))


def fail(argv: list[str]) -> None:
    raise IllmError("this experiment fails")
