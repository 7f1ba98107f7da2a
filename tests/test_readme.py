"""The README stays true: its config reference matches the dataclass docs, its two commands exist."""

import runpy
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_config_reference_is_current():
    script = runpy.run_path(str(REPO / "scripts" / "update_readme.py"))  # its functions, not its main
    text = (REPO / "README.md").read_text()
    assert script["updated"](text) == text, (
        "README.md config reference is stale: run python scripts/update_readme.py"
    )


def test_readme_names_the_two_commands_and_they_exist():
    readme = (REPO / "README.md").read_text()
    makefile = (REPO / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in readme
        assert f"\n{target}:" in makefile
