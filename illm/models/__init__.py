"""The networks of MS-ILLM: HiFiC autoencoder, VQ-VAE labeller, conditional U-Net discriminator."""
