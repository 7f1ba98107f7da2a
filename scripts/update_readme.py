"""Regenerate the config reference in README.md from the dataclass docs (`--check`: only compare).

python scripts/update_readme.py [--check]
"""

import sys
from pathlib import Path

from illm.config import reference_markdown
from illm.experiment import FinetuneConfig, PretrainConfig, VQVAEConfig

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
TABLES = [
    (VQVAEConfig, "Stage 0 — `scripts/train_vqvae.py`"),
    (PretrainConfig, "Stage 1 — `scripts/pretrain.py`"),
    (FinetuneConfig, "Stage 2 — `scripts/finetune_gan.py`"),
]


def generated() -> str:
    return "\n".join(reference_markdown(cls, title) for cls, title in TABLES)


def updated(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{generated()}{END}{tail}"


if __name__ == "__main__":
    text = README.read_text()
    new = updated(text)
    if "--check" in sys.argv[1:]:
        sys.exit(
            0 if new == text else "README.md config reference is stale: run python scripts/update_readme.py"
        )
    README.write_text(new)
    print("README.md config reference updated")
