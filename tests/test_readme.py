"""The README stays true: its generated sections are current, its expected results are the official
numbers, and its commands and Python blocks run (on tiny stand-ins)."""

import importlib
import importlib.util
import re
import runpy
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data

from helpers.paths import REPO, TINY_CONFIGS
from illm import cli, evaluate, experiment, export, zoo
from illm.config import load_config


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


# --- every command and Python block of the README runs -------------------------------------------------
#
# On tiny stand-ins: the released configs become the tiny ones (keeping the released run folder
# and init.*), training runs 2 steps, /data/... folders are generated images, official names
# load official-format tiny weights from the hub cache (never the network), and everything runs
# in a temporary folder. Commands that need a cluster, a server or hundreds of GB are exempt and
# checked for syntax instead.

STAGES = {  # script -> (stage module, config class, tiny config)
    "scripts/train_vqvae.py": ("vqvae", "VQVAEConfig", "vqvae.toml"),
    "scripts/pretrain.py": ("pretrain", "PretrainConfig", "pretrain.toml"),
    "scripts/finetune_gan.py": ("finetune", "FinetuneConfig", "finetune.toml"),
}
SHORT_RUN = ["train.max_steps=2", "checkpoint.every=2", "logging.val_every=2", "data.val_max_images=2"]
EXEMPT = {  # first word -> why it does not run here
    "make": "runs the whole demo or suite (test_readme_names_the_two_commands_and_they_exist)",
    "aws": "downloads hundreds of GB",
    "sbatch": "needs SLURM",
    "tensorboard": "starts a server",
}


def readme_blocks(language: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    return [block for block in re.findall(rf"```{language}\n(.*?)```", text, re.S)]


def readme_commands() -> list[str]:
    """The shell commands of the README's bash blocks: continuations joined, comments dropped."""
    commands = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def test_every_readme_command_runs_here_or_is_exempt():
    runnable = (
        "illm",
        "python scripts/export.py",
        "python scripts/evaluate.py",
        "accelerate launch scripts/",
    )
    for command in readme_commands():
        assert command.startswith(runnable) or command.split()[0] in EXEMPT, command
        if command.split()[0] == "sbatch":  # the script parses and gets the config it is given
            script = next(word for word in command.split() if word.endswith(".sbatch"))
            subprocess.run(["bash", "-n", str(REPO / script)], check=True)
            assert all((REPO / w).is_file() for w in command.split() if w.startswith("configs/")), command
        elif command.split()[0] == "aws":
            subprocess.run(["bash", "-n", "-c", command], check=True)
        elif command.split()[0] == "tensorboard":
            assert importlib.util.find_spec("tensorboard") is not None


def tiny_stage_argv(script: str, words: list[str]) -> list[str]:
    """A stage command's arguments with the released config swapped for the tiny one."""
    stage, config_class, tiny = STAGES[script]
    released = REPO / words[0]
    cfg = load_config(getattr(experiment, config_class), released)
    kept = [f"run.dir={cfg.run.dir}"]
    if stage == "finetune":
        kept += [f"init.autoencoder={cfg.init.autoencoder}", f"init.labeller={cfg.init.labeller}"]
    overrides, flags = [], []
    rest = iter(words[1:])
    for word in rest:
        if word.startswith("--"):
            flags += [word, next(rest)]  # --sweep KEY=VALUES
        else:
            overrides.append(word)
    return [str(TINY_CONFIGS / tiny), *kept, *overrides, *SHORT_RUN, *flags]


def run_command(command: str, folders: dict[str, Path]) -> None:
    for name, folder in folders.items():
        command = command.replace(name, str(folder))
    command = command.replace("--checkpoint 1000000", "--checkpoint 2")  # the last step of a 2-step run
    words = shlex.split(command)
    if words[0] == "illm":
        assert cli.main(words[1:]) == 0, command
    elif words[:2] == ["python", "scripts/export.py"]:
        assert export.main(words[2:]) == 0, command
    elif words[:2] == ["python", "scripts/evaluate.py"]:
        assert evaluate.main([*words[2:], "--metrics", "psnr,ms_ssim", "--device", "cpu"]) == 0, command
    elif words[:2] == ["accelerate", "launch"]:
        module = importlib.import_module(f"illm.stages.{STAGES[words[2]][0]}")
        module.cli(tiny_stage_argv(words[2], words[3:]))  # raises SystemExit on failure
    else:
        assert words[0] in EXEMPT, command


def place_official_weights(cache: Path) -> None:
    """Official-format tiny weights under the official file names of the names the README uses."""
    from helpers.models import tiny_autoencoder

    cache.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(("msillm_quality_3", "noganms_quality_3")):
        torch.save(tiny_autoencoder(seed).state_dict(), zoo.official_path(name))
    torch.manual_seed(0)
    labeller = zoo.vqvae(ch=8, ch_mult=(1, 1, 1, 1), embed_dim=8, attention_levels=())
    torch.save(labeller.state_dict(), zoo.official_path("vqvae_xcit_p8_ch64_cb1024_h8"))


@pytest.mark.slow  # trains every stage for a few steps, runs a sweep in child processes
def test_readme_commands_and_python_blocks_run_in_order(offline, tmp_path, monkeypatch, capsys):
    from helpers.synthetic import synthetic_images

    place_official_weights(offline)
    work = tmp_path / "work"
    work.mkdir()
    folders = {  # the README's folder -> (count, size) of generated images
        "/data/openimages/train": (6, (80, 96)),
        "/data/openimages/validation": (2, (192, 200)),
        "/data/kodak": (2, (192, 256)),
        "/data/clic2020/test": (1, (192, 256)),
        "/data/DIV2K_valid_HR": (1, (192, 256)),
    }
    for seed, (name, (count, size)) in enumerate(list(folders.items())):
        folders[name] = tmp_path / "data" / name.strip("/").replace("/", "_")
        synthetic_images(folders[name], count, size, seed=seed)
    Image.fromarray(data.astronaut()[:256, :320]).save(work / "photo.png")
    monkeypatch.chdir(work)
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the sweep's child processes
    for command in readme_commands():
        run_command(command, folders)
    capsys.readouterr()
    for block in readme_blocks("python"):
        exec(block.replace('torch.hub.load(".",', f"torch.hub.load({str(REPO)!r},"), {})
    assert (work / "decoded.png").is_file() and (work / "photo_mine.illm").is_file()
    assert (work / "runs" / "finetune_0.14bpp" / "gan.generator_weight=0.016").is_dir()  # the sweep


def test_expected_results_are_the_official_numbers():
    """Each dataset table of the README lists the official rows, lowest bpp first, No-GAN under the
    stage-1 configs and MS-ILLM under the stage-2 ones."""
    import csv

    text = (REPO / "README.md").read_text()
    block = text.split("<!-- expected-results:start -->")[1].split("<!-- expected-results:end -->")[0]
    tables = dict(
        re.findall(r"\*\*(Kodak|CLIC2020 test|DIV2K valid)\*\*.*?\n\n(.*?)(?:\n\n|\Z)", block, re.S)
    )
    names = {"kodak": "Kodak", "clic2020": "CLIC2020 test", "div2k": "DIV2K valid"}
    with (REPO / "illm" / "resources" / "official_results.csv").open() as file:
        official = list(csv.DictReader(file))
    for dataset, title in names.items():
        rows = [line.strip("|").split("|") for line in tables[title].splitlines()[2:]]
        for model, stage2 in (("No-GAN", False), ("MS-ILLM", True)):
            mine = [[c.strip() for c in r] for r in rows if r[0].strip().startswith("`finetune_") == stage2]
            theirs = sorted(
                (r for r in official if (r["model"], r["dataset"]) == (model, dataset)),
                key=lambda r: float(r["bpp"]),
            )
            assert [(m[1], m[2], m[3]) for m in mine] == [
                (f"{float(r['bpp']):.4f}", f"{float(r['psnr']):.2f}", f"{float(r['ms_ssim']):.4f}")
                for r in theirs
            ], (dataset, model)
            if dataset != "kodak":
                assert [m[4] for m in mine] == [f"{float(r['fid']):.2f}" for r in theirs]
