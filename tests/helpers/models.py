"""Tiny models for tests that need real weights but not real quality."""

import torch

TINY_AUTOENCODER = dict(
    latent_channels=8, hyper_channels=8, encoder_channels=(8, 8, 16, 16, 16), num_residual_blocks=1
)
TINY_VQVAE = dict(
    ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, embed_dim=16, codebook_size=32, codebook_dim=4
)


def tiny_autoencoder(seed: int = 0):
    """A tiny HiFiC autoencoder with coder tables, eval mode, weights from `seed`."""
    from illm.models.hific import HiFiCAutoencoder

    torch.manual_seed(seed)
    model = HiFiCAutoencoder(**TINY_AUTOENCODER).eval()
    model.update(force=True)
    return model
