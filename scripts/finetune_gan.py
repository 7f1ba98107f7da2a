"""Stage 2 entry point: accelerate launch scripts/finetune_gan.py CONFIG.toml [section.key=value ...] [--sweep section.key=v1,v2 ...]"""

from illm.stages.finetune import cli

if __name__ == "__main__":
    cli()
