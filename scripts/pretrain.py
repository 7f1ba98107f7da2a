"""Stage 1 entry point: accelerate launch scripts/pretrain.py CONFIG.toml [section.key=value ...]"""

from illm.stages.pretrain import cli

if __name__ == "__main__":
    cli()
