"""What an experiment is made of: the config sections of every training stage.

Each section is a dataclass whose fields carry their default and a one-line doc; the TOML
files in `configs/` set them and `illm.config.load_config` checks them. Components are
picked by name from small explicit tables (`choices`), never by import path.
"""

from __future__ import annotations

from dataclasses import dataclass

from illm.config import (
    ConfigError,
    all_positive,
    doc_field,
    multiple_of,
    non_negative,
    positive,
)
from illm.optimizer import LR_SCHEDULES

MIXED_PRECISION = ("no", "bf16", "fp16")
CROP_MODES = ("random_crop", "random_resized_crop", "either")
LPIPS_NETS = ("alex", "vgg")
BACKBONE_WEIGHTS = ("pretrained", "random")


# --- sections shared by every stage -------------------------------------------------------------


@dataclass
class RunSection:
    dir: str = doc_field("runs/pretrain", "Run folder: checkpoints, TensorBoard events, resolved config.")
    seed: int = doc_field(18, "Seed of every random number generator (offset by process index).")
    resume: bool = doc_field(
        False, "Continue the run in `run.dir` even if its config differs (same config resumes anyway)."
    )
    overwrite: bool = doc_field(
        False, "Start over in a `run.dir` that holds another run; its files are moved aside, not deleted."
    )
    resume_from: str = doc_field(
        "", "Resume from this checkpoint file instead of the run's latest (e.g. when the latest is damaged)."
    )


@dataclass
class DataSection:
    train: str = doc_field(
        "", "Folder of training images, searched recursively (JPEG, PNG, WebP, BMP, TIFF, PPM)."
    )
    val: str = doc_field("", "Folder of validation images; empty disables validation.")
    crop_size: int = doc_field(256, "Training crop size in pixels (a multiple of 64).", multiple_of(64))
    crop_mode: str = doc_field(
        "either",
        "Training crop: reflect-padded random crop, random resized crop, or `either` (a 50/50 choice per "
        "image, as the official training).",
        choices=CROP_MODES,
    )
    batch_size: int = doc_field(
        8, "Training images per process and micro-batch (a forward/backward pass).", positive
    )
    global_batch_size: int = doc_field(
        0,
        "Training images per optimizer step, over all processes; 0 = `batch_size` x processes. "
        "It must be a multiple of `batch_size` x processes: the quotient is the number of "
        "micro-batches accumulated per step, so any number of processes trains the same recipe.",
        non_negative,
    )
    num_workers: int = doc_field(4, "Data loader worker processes per training process.", non_negative)
    val_crop_size: int = doc_field(
        256, "Validation images are resized and centre-cropped to this size.", multiple_of(64)
    )
    val_batch_size: int = doc_field(4, "Validation images per process and batch.", positive)
    val_max_images: int = doc_field(256, "Validate on at most this many images (0 = all).", non_negative)


@dataclass
class CheckpointSection:
    every: int = doc_field(10000, "Save a checkpoint every this many steps (and at the end).", positive)
    keep_last: int = doc_field(3, "How many of the most recent checkpoints to keep.", positive)
    best_metric: str = doc_field(
        "val/ms_ssim", "Validation metric that selects `best.pt` (empty: no best checkpoint)."
    )
    best_mode: str = doc_field(
        "max", "Whether a larger or smaller `best_metric` is better.", choices=("max", "min")
    )


@dataclass
class LoggingSection:
    every: int = doc_field(100, "Write training scalars to TensorBoard every this many steps.", positive)
    val_every: int = doc_field(10000, "Validate (metrics and image grids) every this many steps.", positive)
    num_images: int = doc_field(
        4, "Fixed training and validation images shown in the TensorBoard grids.", non_negative
    )


@dataclass
class LPIPSSection:
    net: str = doc_field("alex", "LPIPS backbone.", choices=LPIPS_NETS)
    backbone_weights: str = doc_field(
        "pretrained",
        "`random` uses an untrained backbone (tests, offline demos): the LPIPS numbers are then not "
        "comparable.",
        choices=BACKBONE_WEIGHTS,
    )


# --- stage 1: autoencoder pre-training ------------------------------------------------------------


@dataclass
class AutoencoderSection:
    latent_channels: int = doc_field(220, "Channels of the latent y (official: 220).", positive)
    hyper_channels: int = doc_field(320, "Channels of the hyper-latent z (official: 320).", positive)
    encoder_channels: list[int] = doc_field(
        [60, 120, 240, 480, 960],
        "Encoder widths, first conv then the four stride-2 convs (the generator mirrors them).",
        all_positive,
    )
    num_residual_blocks: int = doc_field(9, "Residual blocks in the generator (official: 9).", positive)


@dataclass
class TrainSection:
    max_steps: int = doc_field(
        1_000_000, "Training iterations (one optimizer step of the model each).", positive
    )
    grad_clip: float = doc_field(
        1.0, "Clip the gradient norm of the trained model to this (0 = off).", non_negative
    )
    mixed_precision: str = doc_field(
        "no",
        "Autocast precision of the networks; entropy models and the rate loss stay float32.",
        choices=MIXED_PRECISION,
    )
    channels_last: bool = doc_field(
        False,
        "Run the trained networks on channels-last tensors (faster convolutions); same numbers up to float "
        "rounding.",
    )
    fused_optimizer: bool = doc_field(
        False,
        "Use torch's fused AdamW kernel (one pass over all parameters); same numbers up to float rounding.",
    )


@dataclass
class OptimSection:
    lr: float = doc_field(3e-4, "AdamW learning rate of the autoencoder.", positive)
    weight_decay: float = doc_field(5e-5, "AdamW weight decay of the autoencoder.", non_negative)
    betas: list[float] = doc_field([0.9, 0.999], "AdamW betas of the autoencoder.")
    schedule: str = doc_field(
        "ramp_quarter_cosine",
        "Learning-rate schedule: `ramp_quarter_cosine` (official: linear ramp, then a quarter cosine "
        "over `decay_steps`), `ramp_half_cosine` (linear warm-up, then a half cosine to 0 at "
        "`decay_steps`) or `constant`.",
        choices=tuple(LR_SCHEDULES),
    )
    warmup_steps: int = doc_field(10_000, "Linear warm-up (ramp) iterations of the schedule.", non_negative)
    decay_steps: int = doc_field(
        1_000_000,
        "Cosine length: `ramp_quarter_cosine` spans a quarter period over this many iterations after "
        "the ramp; `ramp_half_cosine` reaches 0 at this iteration.",
        positive,
    )
    aux_lr: float = doc_field(
        1e-3, "AdamW learning rate of the entropy-bottleneck quantiles (constant).", positive
    )
    aux_weight_decay: float = doc_field(
        0.01, "AdamW weight decay of the quantiles (official: torch's default, 0.01).", non_negative
    )


@dataclass
class DistortionSection:
    kind: str = doc_field("mse_lpips", "Distortion loss.", choices=("mse", "mse_lpips"))
    mse_weight: float = doc_field(150.0, "Weight of the MSE on [0, 1] images.", non_negative)
    lpips_weight: float = doc_field(1.0, "Weight of LPIPS (with `mse_lpips`).", non_negative)
    lam: float = doc_field(1.0, "Multiplier of the whole distortion term in the loss.", non_negative)


@dataclass
class RateSection:
    target_bpp: float = doc_field(0.14, "Target rate in bits per pixel.", positive)
    lam_below: float = doc_field(
        0.0625, "Rate weight for images whose rounded bpp is at or below the target.", non_negative
    )
    lam_above: float = doc_field(2.0, "Rate weight λ_b for images above the target.", non_negative)
    warmup_target_factor: float = doc_field(1.429, "Target multiplier before `warmup_steps`.", positive)
    warmup_lam_factor: float = doc_field(0.5, "λ_b multiplier before `warmup_steps`.", positive)
    warmup_steps: int = doc_field(
        25_000, "Iteration at which target and λ_b switch to their final values.", non_negative
    )


@dataclass
class PretrainConfig:
    """Stage 1: the HiFiC autoencoder trained for rate and distortion."""

    run: RunSection = doc_field(RunSection(), "")
    data: DataSection = doc_field(DataSection(), "")
    model: AutoencoderSection = doc_field(AutoencoderSection(), "")
    train: TrainSection = doc_field(TrainSection(), "")
    optim: OptimSection = doc_field(OptimSection(), "")
    distortion: DistortionSection = doc_field(DistortionSection(), "")
    lpips: LPIPSSection = doc_field(LPIPSSection(), "")
    rate: RateSection = doc_field(RateSection(), "")
    checkpoint: CheckpointSection = doc_field(CheckpointSection(), "")
    logging: LoggingSection = doc_field(LoggingSection(), "")

    def validate(self):
        _check_betas("optim.betas", self.optim.betas)
        if len(self.model.encoder_channels) != 5:
            raise ConfigError(
                f"key 'model.encoder_channels': must have 5 entries, got {self.model.encoder_channels}"
            )
        _check_schedule(self.optim)


# --- stage 0: the VQ-VAE labeller ------------------------------------------------------------------


@dataclass
class VQVAESection:
    ch: int = doc_field(64, "Base width of the encoder/decoder (official: 64).", positive)
    ch_mult: list[int] = doc_field(
        [1, 2, 2, 4],
        "Width multipliers per resolution level; len - 1 stride-2 steps (official: 8x down).",
        all_positive,
    )
    num_res_blocks: int = doc_field(2, "Residual blocks per level (official: 2).", positive)
    attention_levels: list[int] = doc_field(
        [3],
        "Levels with XCiT attention besides the middle (official: the lowest resolution, 32 for 256 crops).",
    )
    embed_dim: int = doc_field(256, "Channels around the bottleneck (official: 256).", positive)
    codebook_size: int = doc_field(
        1024, "Codebook entries = discriminator classes - 1 (official: 1024).", positive
    )
    codebook_dim: int = doc_field(8, "Dimension of the L2-normalised codes (official: 8).", positive)


@dataclass
class VQVAELossSection:
    reconstruction: str = doc_field("l1", "Pixel reconstruction loss.", choices=("l1", "mse"))
    reconstruction_weight: float = doc_field(1.0, "Weight of the pixel loss.", non_negative)
    lpips_weight: float = doc_field(1.0, "Weight of LPIPS (0 = off).", non_negative)
    commitment_beta: float = doc_field(
        0.25, "Weight β of the commitment loss (encoder pulled toward its code).", non_negative
    )
    codebook_weight: float = doc_field(
        1.0, "Weight of the codebook loss (codes pulled toward the encoder).", non_negative
    )


@dataclass
class CodebookSection:
    reseed_dead: bool = doc_field(
        True, "Re-seed codes unused for `dead_after` steps from recent encoder outputs."
    )
    dead_after: int = doc_field(1000, "Steps without a hit after which a code counts as dead.", positive)
    reseed_every: int = doc_field(1000, "Check for dead codes every this many steps.", positive)


@dataclass
class VQVAEOptimSection:
    lr: float = doc_field(2e-4, "AdamW learning rate.", positive)
    weight_decay: float = doc_field(0.0, "AdamW weight decay.", non_negative)
    betas: list[float] = doc_field([0.9, 0.99], "AdamW betas.")
    schedule: str = doc_field(
        "ramp_half_cosine",
        "Learning-rate schedule (see `optim.schedule` of stage 1).",
        choices=tuple(LR_SCHEDULES),
    )
    warmup_steps: int = doc_field(5000, "Linear warm-up iterations of the schedule.", non_negative)
    decay_steps: int = doc_field(
        300_000, "Cosine length (iteration at which `ramp_half_cosine` reaches 0).", positive
    )


@dataclass
class VQVAEConfig:
    """Stage 0: the VQ-VAE whose codes label real image patches for the discriminator."""

    run: RunSection = doc_field(RunSection(dir="runs/vqvae"), "")
    data: DataSection = doc_field(DataSection(batch_size=16), "")
    model: VQVAESection = doc_field(VQVAESection(), "")
    train: TrainSection = doc_field(TrainSection(max_steps=300_000), "")
    optim: VQVAEOptimSection = doc_field(VQVAEOptimSection(), "")
    loss: VQVAELossSection = doc_field(VQVAELossSection(), "")
    codebook: CodebookSection = doc_field(CodebookSection(), "")
    lpips: LPIPSSection = doc_field(LPIPSSection(), "")
    checkpoint: CheckpointSection = doc_field(CheckpointSection(best_metric="val/psnr"), "")
    logging: LoggingSection = doc_field(LoggingSection(), "")

    def validate(self):
        _check_betas("optim.betas", self.optim.betas)
        _check_schedule(self.optim)
        if self.train.channels_last:
            raise ConfigError(
                "key 'train.channels_last': not supported in stage 0 (the XCiT attention reshapes NCHW "
                "tensors)"
            )
        levels = len(self.model.ch_mult)
        if any(not 0 <= a < levels for a in self.model.attention_levels):
            raise ConfigError(
                f"key 'model.attention_levels': entries must be in [0, {levels}), got "
                f"{self.model.attention_levels}"
            )
        if self.data.crop_size % 2 ** (levels - 1):
            raise ConfigError(f"key 'data.crop_size': must be a multiple of {2 ** (levels - 1)}")


# --- stage 2: MS-ILLM GAN fine-tuning -----------------------------------------------------------------


@dataclass
class InitSection:
    autoencoder: str = doc_field(
        "noganms_quality_3",
        "Stage-1 start: a run folder, a checkpoint, an exported weights file or an official No-GAN name.",
    )
    labeller: str = doc_field(
        "vqvae_xcit_p8_ch64_cb1024_h8",
        "VQ-VAE labeller: a stage-0 run folder, checkpoint, exported file or the official name.",
    )


@dataclass
class FreezeSection:
    encoder: bool = doc_field(
        False,
        "Keep the encoder frozen (eval mode, no gradients). False trains it, as the released weights "
        "were made (recipe (a)); true is the seed README's recipe (b).",
    )
    bottleneck: bool = doc_field(
        False,
        "Keep hyper-analysis/synthesis and entropy models frozen (eval mode, no gradients). False trains "
        "them and runs the quantile optimizer, as the released weights were made (recipe (a)).",
    )


@dataclass
class DiscriminatorSection:
    target: str = doc_field(
        "vq",
        "`vq`: per-patch VQ labels (MS-ILLM); `binary`: real/fake patches (the paper's ablation).",
        choices=("vq", "binary"),
    )
    channels: list[int] = doc_field(
        [128, 128, 256, 256, 512, 512], "U-Net widths after the RGB + context input (official).", all_positive
    )
    context_channels: int = doc_field(16, "Channels the latent context is projected to.", positive)
    norm: str = doc_field(
        "identity",
        "Normalisation in the U-Net blocks.",
        choices=("identity", "spectral", "instance", "batch"),
    )


@dataclass
class GANOptimSection:
    lr: float = doc_field(1e-4, "AdamW learning rate of the generator (constant).", positive)
    betas: list[float] = doc_field([0.5, 0.9], "AdamW betas of the generator.")
    weight_decay: float = doc_field(0.0, "AdamW weight decay of the generator.", non_negative)
    disc_lr: float = doc_field(4e-4, "AdamW learning rate of the discriminator (constant).", positive)
    disc_betas: list[float] = doc_field([0.5, 0.9], "AdamW betas of the discriminator.")
    disc_weight_decay: float = doc_field(0.0, "AdamW weight decay of the discriminator.", non_negative)
    aux_lr: float = doc_field(
        1e-3, "AdamW learning rate of the quantiles (only with freeze.bottleneck = false).", positive
    )
    aux_weight_decay: float = doc_field(
        0.01, "AdamW weight decay of the quantiles (official: 0.01).", non_negative
    )


@dataclass
class GANLossSection:
    generator_weight: float = doc_field(
        0.008, "Weight of the adversarial (OASIS) generator loss.", non_negative
    )
    mc_sampling: bool = doc_field(
        True,
        "Split each batch: first half compressed, second half the discriminator's real images (as released).",
    )


@dataclass
class FinetuneConfig:
    """Stage 2: the generator fine-tuned against the conditional U-Net discriminator (OASIS loss)."""

    run: RunSection = doc_field(RunSection(dir="runs/finetune"), "")
    init: InitSection = doc_field(InitSection(), "")
    data: DataSection = doc_field(DataSection(batch_size=16), "")
    freeze: FreezeSection = doc_field(FreezeSection(), "")
    discriminator: DiscriminatorSection = doc_field(DiscriminatorSection(), "")
    train: TrainSection = doc_field(TrainSection(max_steps=100_000), "")
    optim: GANOptimSection = doc_field(GANOptimSection(), "")
    distortion: DistortionSection = doc_field(DistortionSection(), "")
    lpips: LPIPSSection = doc_field(LPIPSSection(), "")
    rate: RateSection = doc_field(RateSection(warmup_steps=0), "")
    gan: GANLossSection = doc_field(GANLossSection(), "")
    checkpoint: CheckpointSection = doc_field(CheckpointSection(), "")
    logging: LoggingSection = doc_field(LoggingSection(), "")

    def validate(self):
        _check_betas("optim.betas", self.optim.betas)
        _check_betas("optim.disc_betas", self.optim.disc_betas)
        if self.gan.mc_sampling and self.data.batch_size < 2:
            raise ConfigError(
                "key 'data.batch_size': must be >= 2 with gan.mc_sampling = true (the batch is split in "
                "halves)"
            )
        if self.train.mixed_precision == "fp16":
            # Two optimizers would share Accelerate's one GradScaler, whose update after the first
            # step re-arms unscaling for the second: use bf16 (no scaler) instead.
            raise ConfigError(
                "key 'train.mixed_precision': 'fp16' is not supported in stage 2 (one loss scaler, two "
                "optimizers); use 'bf16' or 'no'"
            )
        widths = len(self.discriminator.channels)
        if widths < 4:
            raise ConfigError(
                "key 'discriminator.channels': needs at least 4 widths (logits at 1/8 of the image), got "
                f"{self.discriminator.channels}"
            )
        if self.data.crop_size % 2**widths:
            raise ConfigError(
                f"key 'data.crop_size': must be a multiple of {2**widths} for {widths} discriminator "
                f"levels, got {self.data.crop_size}"
            )


def _check_schedule(optim) -> None:
    if optim.schedule == "ramp_half_cosine" and optim.warmup_steps >= optim.decay_steps:
        raise ConfigError("key 'optim.warmup_steps': must be smaller than 'optim.decay_steps'")


def _check_betas(key: str, betas) -> None:
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"key '{key}': must be two numbers in [0, 1), got {list(betas)}")
