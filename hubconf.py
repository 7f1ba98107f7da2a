"""torch.hub entry points under the official MS-ILLM names, built by `illm.zoo`.

    model = torch.hub.load("<owner>/illm", "msillm_quality_3")            # from GitHub
    model = torch.hub.load("/path/to/illm", "msillm_quality_3", source="local")

The MS-ILLM (``msillm_quality_1`` .. ``6``, ``vlo1``, ``vlo2``) and No-GAN (``noganms_quality_1``
.. ``6``) autoencoders and the VQ-VAE labeller (``msillm_vqvae_xcit_p8_ch64_cb1024_h8``) load the
official weights (CC-BY-NC 4.0, non-commercial use; downloaded once into the torch hub cache)
with ``pretrained=True``, the default; ``pretrained=False`` gives the same architecture randomly
initialised. ``discriminator`` is this project's conditional U-Net discriminator, always randomly
initialised. Autoencoders come back in eval mode with their coder tables built, ready for
`illm.codec.compress` / `illm.codec.decompress`.
"""

from illm import official

dependencies = ["torch", "compressai", "timm", "PIL"]


def _autoencoder_entry(name: str, family: str, target_bpp: str):
    def entry(pretrained: bool = True, device: str = "cpu", precision: str = "fp32", **kwargs):
        from illm import zoo

        if not pretrained:
            return zoo.autoencoder(**kwargs).to(device).eval()
        if kwargs:
            raise TypeError(f"{name}: architecture arguments {sorted(kwargs)} need pretrained=False")
        return zoo.load(name, kind="autoencoder", device=device, precision=precision)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (
        f"{family} autoencoder for a target of {target_bpp} bpp: the official weights "
        f"({official.LICENSE}) with pretrained=True, else the architecture randomly initialised "
        "(keyword arguments then override `illm.zoo.autoencoder`'s). device: cpu or cuda; precision: "
        "fp32 or bf16 for the encoder and generator."
    )
    return entry


for _model in official.official_models():
    if _model.target_bpp:
        globals()[_model.name] = _autoencoder_entry(_model.name, _model.family, _model.target_bpp)


def msillm_vqvae_xcit_p8_ch64_cb1024_h8(pretrained: bool = True, device: str = "cpu", **kwargs):
    """The VQ-VAE labeller of MS-ILLM's discriminator (codebook of 1024): the official weights
    (CC-BY-NC 4.0) with pretrained=True, else the architecture randomly initialised (keyword
    arguments then override `illm.zoo.vqvae`'s)."""
    from illm import zoo

    if not pretrained:
        return zoo.vqvae(**kwargs).to(device).eval()
    if kwargs:
        raise TypeError(f"architecture arguments {sorted(kwargs)} need pretrained=False")
    return zoo.load("msillm_vqvae_xcit_p8_ch64_cb1024_h8", kind="vqvae", device=device)


def discriminator(device: str = "cpu", **kwargs):
    """This project's conditional U-Net discriminator (`illm.zoo.discriminator`; keyword arguments
    override the official architecture), RANDOMLY INITIALISED: no official discriminator weights
    were released, so there is nothing pretrained to load. Train it with scripts/finetune_gan.py."""
    from illm import zoo

    return zoo.discriminator(**kwargs).to(device)
