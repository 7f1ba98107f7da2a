"""Stage 0 entry point: accelerate launch scripts/train_vqvae.py CONFIG.toml [section.key=value ...]"""

from illm.stages.vqvae import cli

if __name__ == "__main__":
    cli()
