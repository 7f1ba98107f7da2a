"""Regenerate the generated parts of README.md (`--check`: only compare):

- the config reference, from the dataclass docs;
- the expected results, from the released configs and illm/resources/official_results.csv.

python scripts/update_readme.py [--check]
"""

import csv
import re
import sys
from pathlib import Path

from illm.config import load_config, reference_markdown
from illm.experiment import FinetuneConfig, PretrainConfig, VQVAEConfig

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RESULTS = REPO / "illm" / "resources" / "official_results.csv"
BLOCKS = {
    "config-reference": lambda: "\n".join(reference_markdown(cls, title) for cls, title in TABLES),
    "expected-results": lambda: expected_results(),
}
TABLES = [
    (VQVAEConfig, "Stage 0 — `scripts/train_vqvae.py`"),
    (PretrainConfig, "Stage 1 — `scripts/pretrain.py`"),
    (FinetuneConfig, "Stage 2 — `scripts/finetune_gan.py`"),
]
# Official weights by target bpp (illm list): No-GAN for stage 1, MS-ILLM for stage 2.
QUALITY = {"0.035": 1, "0.07": 2, "0.14": 3, "0.3": 4, "0.45": 5, "0.9": 6}
DATASETS = {"kodak": "Kodak", "clic2020": "CLIC2020 test", "div2k": "DIV2K valid"}
# The official README: the stage-2 command (0.14 bpp) "should give ... about a 2.3 validation FID".
OFFICIAL_VAL_FID = {"finetune_0.14bpp": "≈ 2.3"}


def released_configs() -> list[tuple[str, str, str]]:
    """(config name, stage, target bpp text) of every released config, stage by stage, by rate."""
    rows = [("vqvae_xcit_p8_ch64_cb1024_h8", "0", "")]
    for stage, prefix in (("1", ""), ("2", "finetune_")):
        names = [p.stem for p in (REPO / "configs").glob(f"{prefix}[0-9]*bpp.toml")]
        targets = sorted((re.search(r"([0-9.]+)bpp$", name).group(1) for name in names), key=float)
        rows += [(f"{prefix}{target}bpp", stage, target) for target in targets]
    return rows


def official_rows() -> dict[tuple[str, str], list[dict]]:
    """(model, dataset) -> the rows of official_results.csv, lowest bpp first."""
    table: dict[tuple[str, str], list[dict]] = {}
    with RESULTS.open() as file:
        for row in csv.DictReader(file):
            table.setdefault((row["model"], row["dataset"]), []).append(row)
    return {key: sorted(rows, key=lambda row: float(row["bpp"])) for key, rows in table.items()}


def matched_results() -> dict[tuple[str, str], dict]:
    """(config, dataset) -> its official row. Rows go to the configs of their model by rank of bpp:
    the lowest-bpp row to the lowest target that has a result (No-GAN has all 8 stage-1 targets,
    MS-ILLM the 6 of its released weights)."""
    configs = released_configs()
    matched = {}
    for (model, dataset), rows in official_rows().items():
        stage = "1" if model == "No-GAN" else "2"
        targets = [(name, target) for name, s, target in configs if s == stage]
        if stage == "2":
            targets = [(name, target) for name, target in targets if target in QUALITY]
        assert len(targets) == len(rows), (model, dataset, len(rows))
        for (name, _), row in zip(targets, rows):
            matched[(name, dataset)] = row
    return matched


def official_weights(stage: str, target: str) -> str:
    if stage == "0":
        return "`vqvae_xcit_p8_ch64_cb1024_h8`"
    if target not in QUALITY:
        return "none"
    return f"`{'noganms' if stage == '1' else 'msillm'}_quality_{QUALITY[target]}`"


def number(text: str, digits: int) -> str:
    return f"{float(text):.{digits}f}" if text else "–"


def expected_results() -> str:
    matched = matched_results()
    lines = [
        "| config | stage | target bpp | official weights | iterations | images seen | official val FID |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, stage, target in released_configs():
        cls = {"0": VQVAEConfig, "1": PretrainConfig, "2": FinetuneConfig}[stage]
        cfg = load_config(cls, REPO / "configs" / f"{name}.toml")
        steps, batch = cfg.train.max_steps, cfg.data.global_batch_size or cfg.data.batch_size
        lines.append(
            f"| `{name}` | {stage} | {target or '–'} | {official_weights(stage, target)} | {steps:,} "
            f"| {steps * batch / 1e6:g} M ({batch} per iteration) | {OFFICIAL_VAL_FID.get(name, '–')} |"
        )
    for dataset, title in DATASETS.items():
        has_fid = dataset != "kodak"
        header = "| config | bpp | PSNR dB | MS-SSIM |" + (" FID | KID |" if has_fid else "")
        lines += [
            "",
            f"**{title}** (official {'MS-ILLM / No-GAN' if has_fid else 'results; no FID/KID'})",
            "",
        ]
        lines += [header, "| --- " * (header.count("|") - 1) + "|"]
        for name, _stage, _ in released_configs():
            row = matched.get((name, dataset))
            if row is None:
                continue
            cells = [number(row["bpp"], 4), number(row["psnr"], 2), number(row["ms_ssim"], 4)]
            if has_fid:
                cells += [number(row["fid"], 2), number(row["kid"], 5)]
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def updated(text: str) -> str:
    for name, generate in BLOCKS.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if start not in text:
            continue
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{generate()}{end}{tail}"
    return text


if __name__ == "__main__":
    text = README.read_text()
    new = updated(text)
    if "--check" in sys.argv[1:]:
        sys.exit(
            0
            if new == text
            else "README.md generated sections are stale: run python scripts/update_readme.py"
        )
    README.write_text(new)
    print("README.md generated sections updated")
