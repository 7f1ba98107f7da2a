"""VQ-VAE labeller: a VQGAN-style autoencoder with XCiT attention and a 1024-entry codebook.

MS-ILLM's discriminator does not predict "real vs fake" but, for every 8x8 patch of a real
image, which codebook entry this VQ-VAE assigns to it. Only the encoder and the bottleneck are
needed for that (`labels`); the decoder exists to train the VQ-VAE (stage 0).

Parameter names and shapes follow the official `VqVaeXCiTAutoencoder` of
facebookresearch/NeuralCompression with the `vqvae_xcit_p8_ch64_cb1024_h8` settings, so its
released state dict loads as is. Images are fed in [0, 1] (no normalisation) and the decoder
output is not squashed, exactly as in the official model.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.xcit import XCA
from torch import Tensor, nn

from illm.errors import ConfigError, IllmError
from illm.models.layers import ChannelNorm2d, load_strict


@dataclass
class VQVAEOutput:
    """What `VQVAE.forward` returns."""

    images: Tensor  # reconstruction, B x 3 x H x W, not clamped
    indices: Tensor  # codebook index per latent pixel, B x h x w, int64
    commitment_loss: Tensor  # pulls encoder outputs towards their codes
    codebook_loss: Tensor  # pulls the codes towards the encoder outputs
    latent: Tensor  # L2-normalised projected latent before quantisation, B x D x h x w


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (norm, swish, conv) twice, 1x1 shortcut if widths differ."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = ChannelNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = ChannelNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttentionBlock(nn.Module):
    """Residual cross-covariance attention over all pixels (cost linear in the pixel count)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = ChannelNorm2d(channels)
        self.xca = XCA(dim=channels, num_heads=1, qkv_bias=True)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # B x HW x C
        attended = self.xca(tokens).transpose(1, 2).reshape(b, c, h, w)
        return x + attended


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding one pixel on the right and bottom (as in VQGAN)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: res blocks (each optionally followed by
    attention), then an optional `downsample` or `upsample`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        attention: bool,
        resample: str | None = None,
    ):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(i, o) for i, o in zip(widths[:-1], widths[1:]))
        self.attn = nn.ModuleList(AttentionBlock(out_channels) for _ in range(num_blocks if attention else 0))
        self.downsample = Downsample(out_channels) if resample == "down" else None
        self.upsample = Upsample(out_channels) if resample == "up" else None

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[i](x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


def _middle(channels: int) -> nn.Sequential:
    return nn.Sequential(
        ResnetBlock(channels, channels), AttentionBlock(channels), ResnetBlock(channels, channels)
    )


class Encoder(nn.Module):
    """Image (B x 3 x H x W) -> embedding (B x embed_dim x H/f x W/f), f = 2**(levels-1)."""

    def __init__(
        self,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attention_levels: Sequence[int],
        embed_dim: int,
    ):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(
                in_channels=([ch] + widths)[i],
                out_channels=widths[i],
                num_blocks=num_res_blocks,
                attention=i in attention_levels,
                resample="down" if i != last else None,
            )
            for i in range(len(widths))
        )
        self.mid = _middle(widths[-1])
        self.norm_out = ChannelNorm2d(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], embed_dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """Embedding (B x embed_dim x h x w) -> image (B x 3 x h*f x w*f); one more res block per
    level than the encoder, as in VQGAN."""

    def __init__(
        self,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attention_levels: Sequence[int],
        embed_dim: int,
    ):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(embed_dim, widths[-1], 3, padding=1)
        self.mid = _middle(widths[-1])
        # `up[i]` works at the resolution of encoder level i, so it runs in reverse order.
        self.up = nn.ModuleList(
            Level(
                in_channels=(widths + [widths[-1]])[i + 1],
                out_channels=widths[i],
                num_blocks=num_res_blocks + 1,
                attention=i in attention_levels,
                resample="up" if i != 0 else None,
            )
            for i in range(len(widths))
        )
        self.norm_out = ChannelNorm2d(widths[0])
        self.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantisation of unit vectors against an L2-normalised codebook.

    Buffers (names fixed by the official checkpoint):
      codebook_hits_0  how often each code was picked in training forwards since the last
                       `reset_hits()` (eval-mode calls and `labels` do not count);
      perplexities, max_hits, percentage_hits
                       a summary of those counts (exp of the usage entropy, the largest count,
                       the share of codes used), refreshed by `VQVAE.codebook_usage()`.
    """

    def __init__(self, codebook_size: int, codebook_dim: int):
        super().__init__()
        # Random directions: the codebook is normalised before use, so only directions matter.
        self.codebooks = nn.ParameterList([nn.Parameter(torch.randn(codebook_size, codebook_dim))])
        self.register_buffer("codebook_hits_0", torch.zeros(codebook_size, dtype=torch.long))
        self.register_buffer("perplexities", torch.zeros(1))
        self.register_buffer("max_hits", torch.zeros(1))
        self.register_buffer("percentage_hits", torch.zeros(1))

    @property
    def codebook(self) -> nn.Parameter:
        return self.codebooks[0]

    def reset_hits(self) -> None:
        self.codebook_hits_0.zero_()

    def forward(self, z: Tensor, count_hits: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Quantise unit vectors z (B x D x h x w), adding to the hit counts if `count_hits`.

        Returns the straight-through quantised latent, the indices (B x h x w), and the
        commitment and codebook losses. Distances are computed in float32 even under autocast,
        so that the labels do not depend on the training precision.
        """
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            b, d, h, w = z.shape
            vectors = z.permute(0, 2, 3, 1).reshape(-1, d)
            codebook = F.normalize(self.codebook.float(), dim=1)
            # Squared distance minus the per-vector constant |z|^2 (irrelevant to the argmin).
            distances = codebook.square().sum(1) - 2 * vectors @ codebook.t()
            indices = distances.argmin(dim=1)
            quantized = codebook[indices].view(b, h, w, d).permute(0, 3, 1, 2)

            commitment_loss = F.mse_loss(z, quantized.detach())
            codebook_loss = F.mse_loss(quantized, z.detach())
            straight_through = z + (quantized - z).detach()

        if count_hits:
            with torch.no_grad():
                self.codebook_hits_0.index_add_(0, indices, torch.ones_like(indices))
        return straight_through, indices.view(b, h, w), commitment_loss, codebook_loss


class ProjectedQuantizer(nn.Module):
    """1x1 conv down to the codebook dimension, L2-normalise, quantise, 1x1 conv back up."""

    def __init__(self, embed_dim: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.input_conv = nn.Conv2d(embed_dim, codebook_dim, 1)
        self.output_conv = nn.Conv2d(codebook_dim, embed_dim, 1)
        # The official bottleneck nests ProjectLatent -> NormalizeLatent -> VQBottleneck, each
        # holding the next as `child`; the empty middle module keeps the state-dict names.
        self.child = nn.Module()
        self.child.child = VectorQuantizer(codebook_size, codebook_dim)

    @property
    def quantizer(self) -> VectorQuantizer:
        return self.child.child

    def project(self, embedding: Tensor) -> Tensor:
        """Encoder embedding -> unit-norm latent vectors (B x codebook_dim x h x w)."""
        return F.normalize(self.input_conv(embedding), dim=1)


class VQVAE(nn.Module):
    """VQGAN-style VQ-VAE with XCiT attention; its codebook indices label real images for the
    MS-ILLM discriminator.

    Defaults are the official `vqvae_xcit_p8_ch64_cb1024_h8` architecture: 8x downsampling,
    attention at the lowest resolution level and in the middle blocks, a 256-channel embedding
    projected to 8 dimensions and quantised against 1024 codes.

    Args:
        ch: width of the first level.
        ch_mult: width multiplier per level; the image is downsampled 2**(len(ch_mult)-1) times.
        num_res_blocks: res blocks per encoder level (the decoder has one more per level).
        attention_levels: levels with attention after every res block (default: the last).
        embed_dim: channels of the encoder output / decoder input.
        codebook_size: number of codes (labels are in [0, codebook_size)).
        codebook_dim: dimension of the projected latent and of the codes.
    """

    def __init__(
        self,
        ch: int = 64,
        ch_mult: Sequence[int] = (1, 2, 2, 4),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] | None = None,
        embed_dim: int = 256,
        codebook_size: int = 1024,
        codebook_dim: int = 8,
    ):
        super().__init__()
        ch_mult = tuple(ch_mult)
        if attention_levels is None:
            attention_levels = (len(ch_mult) - 1,)
        attention_levels = tuple(sorted(set(attention_levels)))
        _check_architecture(ch, ch_mult, num_res_blocks, attention_levels, codebook_size)
        self.config = dict(
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            attention_levels=attention_levels,
            embed_dim=embed_dim,
            codebook_size=codebook_size,
            codebook_dim=codebook_dim,
        )
        self.num_codes = codebook_size
        self.downsampling_factor = 2 ** (len(ch_mult) - 1)

        layout = (ch, ch_mult, num_res_blocks, attention_levels, embed_dim)
        self.encoder = Encoder(*layout)
        self.decoder = Decoder(*layout)
        self.bottleneck_op = ProjectedQuantizer(embed_dim, codebook_size, codebook_dim)

    @property
    def quantizer(self) -> VectorQuantizer:
        return self.bottleneck_op.quantizer

    def forward(self, images: Tensor) -> VQVAEOutput:
        """Encode, quantise and decode images in [0, 1] (B x 3 x H x W, any size: reflect-padded
        to a multiple of the downsampling factor inside, the reconstruction is cropped back)."""
        self._check_images(images)
        height, width = images.shape[-2:]
        latent = self.bottleneck_op.project(self.encoder(self._pad(images)))
        quantized, indices, commitment_loss, codebook_loss = self.quantizer(latent, count_hits=self.training)
        decoded = self.decoder(self.bottleneck_op.output_conv(quantized.to(latent.dtype)))
        return VQVAEOutput(
            images=decoded[:, :, :height, :width],
            indices=indices,
            commitment_loss=commitment_loss,
            codebook_loss=codebook_loss,
            latent=latent,
        )

    @torch.no_grad()
    def encode_indices(self, images: Tensor) -> Tensor:
        """Codebook index of every 8x8 patch (for the default factor): images in [0, 1],
        B x 3 x H x W with H and W multiples of the downsampling factor -> int64 B x H/8 x W/8.

        Never counts codebook hits and needs no gradients, whatever the module's mode.
        """
        self._check_images(images)
        if any(size % self.downsampling_factor for size in images.shape[-2:]):
            raise IllmError(
                f"VQ-VAE labels need an image height and width divisible by "
                f"{self.downsampling_factor}, got {tuple(images.shape[-2:])}"
            )
        latent = self.bottleneck_op.project(self.encoder(images))
        return self.quantizer(latent)[1]

    # The name the rest of the project uses: the discriminator's target classes.
    labels = encode_indices

    # ---- codebook health (stage-0 training) -------------------------------------------

    def code_counts(self, indices: Tensor | None = None) -> Tensor:
        """How often each code occurs in `indices`, or in the training hits since the last
        `reset_codebook_hits()` when `indices` is None (int64, num_codes)."""
        if indices is None:
            return self.quantizer.codebook_hits_0.clone()
        return torch.bincount(indices.flatten(), minlength=self.num_codes)

    def dead_codes(self, indices: Tensor | None = None) -> Tensor:
        """Boolean mask (num_codes) of codes that never occur (see `code_counts`)."""
        return self.code_counts(indices) == 0

    @torch.no_grad()
    def codebook_usage(self, indices: Tensor | None = None) -> dict[str, float]:
        """Usage statistics of the codebook over a window of indices.

        With `indices` (any shape), the window is those indices; without, it is the training
        hits since the last `reset_codebook_hits()`, and the checkpointed summary buffers
        (`perplexities`, `max_hits`, `percentage_hits`) are refreshed from it.

        Returns `perplexity` (exp of the entropy of code frequencies: the effective number of
        codes in use, between 1 and num_codes; 0 for an empty window), `used_fraction` (share of
        codes used at least once), `dead_codes` (number never used) and `max_hits`.
        """
        counts = self.code_counts(indices).double()
        probs = counts[counts > 0] / counts.sum()
        perplexity = torch.exp(-(probs * probs.log()).sum()).item() if probs.numel() else 0.0
        used = int((counts > 0).sum())
        stats = {
            "perplexity": perplexity,
            "used_fraction": used / self.num_codes,
            "dead_codes": self.num_codes - used,
            "max_hits": counts.max().item(),
        }
        if indices is None:
            self.quantizer.perplexities.fill_(stats["perplexity"])
            self.quantizer.max_hits.fill_(stats["max_hits"])
            self.quantizer.percentage_hits.fill_(stats["used_fraction"])
        return stats

    def reset_codebook_hits(self) -> None:
        """Start a new usage window: zero the training hit counts."""
        self.quantizer.reset_hits()

    @torch.no_grad()
    def reseed_dead_codes(
        self, recent_latents: Tensor, dead_mask: Tensor, generator: torch.Generator | None = None
    ) -> int:
        """Move every dead code onto a randomly chosen recent encoder output.

        `recent_latents` are `VQVAEOutput.latent` values (B x D x h x w, or N x D vectors);
        distinct vectors are drawn where there are enough. Only the rows of `dead_mask` change.
        Returns the number of codes reseeded. Optimiser state for those rows (e.g. Adam moments)
        is left as it is.
        """
        codebook = self.quantizer.codebook
        dead_mask = dead_mask.to(device=codebook.device, dtype=torch.bool)
        if dead_mask.shape != (self.num_codes,):
            raise ValueError(f"dead_mask must have shape ({self.num_codes},), got {tuple(dead_mask.shape)}")
        if recent_latents.dim() == 4:
            recent_latents = recent_latents.permute(0, 2, 3, 1).flatten(0, 2)
        dim = codebook.shape[1]
        if recent_latents.dim() != 2 or recent_latents.shape[1] != dim:
            raise ValueError(
                f"recent_latents must be B x {dim} x h x w or N x {dim}, got {tuple(recent_latents.shape)}"
            )
        num_dead = int(dead_mask.sum())
        num_vectors = recent_latents.shape[0]
        if num_dead == 0 or num_vectors == 0:
            return 0
        if num_vectors >= num_dead:
            picks = torch.randperm(num_vectors, generator=generator)[:num_dead]
        else:
            picks = torch.randint(num_vectors, (num_dead,), generator=generator)
        chosen = recent_latents[picks.to(recent_latents.device)]
        codebook[dead_mask] = F.normalize(chosen.float(), dim=1).to(codebook)
        return num_dead

    # ---- loading ----------------------------------------------------------------------

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor]) -> "VQVAE":
        """Build the architecture that `state_dict` describes (official or tiny) and load it
        strictly. Raises IllmError naming the offending key when it is not a VQ-VAE state dict."""
        model = cls(**_infer_architecture(state_dict))
        load_strict(model, state_dict, "VQ-VAE")
        return model

    # ---- helpers ----------------------------------------------------------------------

    def _pad(self, images: Tensor) -> Tensor:
        f = self.downsampling_factor
        pad_h, pad_w = -images.shape[-2] % f, -images.shape[-1] % f
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h), mode="reflect")
        return images

    @staticmethod
    def _check_images(images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise IllmError(f"VQ-VAE expects images of shape B x 3 x H x W, got {tuple(images.shape)}")


def _check_architecture(ch, ch_mult, num_res_blocks, attention_levels, codebook_size) -> None:
    if ch < 2 or not ch_mult or min(ch_mult) < 1:
        raise ConfigError(f"VQ-VAE needs ch >= 2 and positive ch_mult, got ch={ch}, ch_mult={ch_mult}")
    if num_res_blocks < 1:
        raise ConfigError(f"VQ-VAE needs num_res_blocks >= 1, got {num_res_blocks}")
    if any(not 0 <= level < len(ch_mult) for level in attention_levels):
        raise ConfigError(
            f"VQ-VAE attention_levels {attention_levels} out of range for {len(ch_mult)} levels"
        )
    if codebook_size < 2:
        raise ConfigError(f"VQ-VAE needs codebook_size >= 2, got {codebook_size}")


_CODEBOOK = "bottleneck_op.child.child.codebooks.0"


def _infer_architecture(state_dict: Mapping[str, Tensor]) -> dict:
    """Constructor arguments of the VQVAE that produced `state_dict`, read off tensor shapes."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise IllmError(f"not a VQ-VAE state dict: key '{key}' is missing")
        return tuple(state_dict[key].shape)

    def count(prefix: str) -> int:
        n = 0
        while any(k.startswith(f"{prefix}.{n}.") for k in state_dict):
            n += 1
        return n

    ch = shape("encoder.conv_in.weight")[0]
    num_levels = count("encoder.down")
    if num_levels == 0:
        raise IllmError("not a VQ-VAE state dict: no 'encoder.down.0.*' keys")
    widths = [shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(num_levels)]
    if any(w % ch for w in widths):
        raise IllmError(f"VQ-VAE state dict: level widths {widths} are not multiples of ch={ch}")
    codebook_size, codebook_dim = shape(_CODEBOOK)
    return dict(
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=count("encoder.down.0.block"),
        attention_levels=tuple(
            i for i in range(num_levels) if f"encoder.down.{i}.attn.0.xca.qkv.weight" in state_dict
        ),
        embed_dim=shape("encoder.conv_out.weight")[0],
        codebook_size=codebook_size,
        codebook_dim=codebook_dim,
    )
