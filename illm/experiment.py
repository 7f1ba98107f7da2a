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
VAL_TRANSFORMS = ("official_resize", "resize_short_side_crop")
LPIPS_NETS = ("alex", "vgg")
BACKBONE_WEIGHTS = ("pretrained", "random")


# --- sections shared by every stage -------------------------------------------------------------


@dataclass
class RunSection:
    """Where the run lives, its seed, and resuming or restarting it."""

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
    collective_timeout_s: float = doc_field(
        1800.0,
        "How long a process waits in a collective (all-reduce, barrier) before it stops with one line: "
        "the time a lost machine costs the others. It must exceed the longest checkpoint write.",
        positive,
    )


@dataclass
class DataSection:
    """The training and validation images: folders, crops, batch sizes, loader workers."""

    train: str = doc_field(
        "", "Folder of training images, searched recursively (JPEG, PNG, WebP, BMP, TIFF, PPM)."
    )
    val: str = doc_field("", "Folder of validation images; empty disables validation.")
    train_list: str = doc_field(
        "",
        "Text file naming the training images, one per line, relative to `data.train` (a name without "
        "extension gets `.jpg`, as in the official OpenImages lists); empty = every image of the folder.",
    )
    val_list: str = doc_field(
        "", "Text file naming the validation images, relative to `data.val`; empty = the whole folder."
    )
    exclude_official_invalid: bool = doc_field(
        False,
        "Leave out of training the 100 OpenImages V6 images the official training skips as very large or "
        "corrupt (matched by file name without extension).",
    )
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
        256, "Validation images are brought to this size by `val_transform`.", multiple_of(64)
    )
    val_transform: str = doc_field(
        "official_resize",
        "`official_resize`: the whole image resized to `val_crop_size` squared, aspect ratio not kept (as "
        "the official validation); `resize_short_side_crop`: shorter side resized, then a centre crop.",
        choices=VAL_TRANSFORMS,
    )
    val_batch_size: int = doc_field(4, "Validation images per process and batch.", positive)
    val_max_images: int = doc_field(
        0,
        "Validate on the first this many images only (0 = the whole folder, as the official).",
        non_negative,
    )


@dataclass
class FIDSection:
    enabled: bool = doc_field(
        True, "Log `val/fid`: reconstructions against originals over the validation set, as the official."
    )
    backbone_weights: str = doc_field(
        "pretrained",
        "Inception-v3 weights of `val/fid`; `random` uses an untrained network (tests, offline runs): "
        "the FID is then not comparable.",
        choices=BACKBONE_WEIGHTS,
    )


@dataclass
class CheckpointSection:
    """How often checkpoints are saved, how many are kept, and which is best.pt."""

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
    """TensorBoard scalars and images, and how often validation runs."""

    every: int = doc_field(100, "Write training scalars to TensorBoard every this many steps.", positive)
    val_every: int = doc_field(10000, "Validate (metrics and image grids) every this many steps.", positive)
    num_images: int = doc_field(
        4, "Fixed training and validation images shown in the TensorBoard grids.", non_negative
    )


@dataclass
class LPIPSSection:
    """The LPIPS network used in the loss and in validation."""

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
    """The HiFiC autoencoder's architecture."""

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
    """Iterations, gradient clipping, mixed precision and speed switches."""

    max_steps: int = doc_field(
        1_000_000, "Training iterations (one optimizer step of the model each).", positive
    )
    grad_clip: float = doc_field(
        1.0,
        "Clip the total gradient norm of each trained network to this (0 = off): the autoencoder, and in "
        "stage 2 the discriminator too, each by its own norm.",
        non_negative,
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
    allow_tf32: bool = doc_field(
        True,
        "Let float32 cuDNN convolutions use TF32 on Ampere and newer GPUs (PyTorch's default, under which "
        "the official models were trained); false: full float32, slower. Coding and evaluation never use TF32.",
    )


@dataclass
class OptimSection:
    """The optimizers and learning-rate schedule of the autoencoder and its quantiles."""

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


@dataclass
class DistortionSection:
    """The distortion loss: MSE and LPIPS weights."""

    kind: str = doc_field("mse_lpips", "Distortion loss.", choices=("mse", "mse_lpips"))
    mse_weight: float = doc_field(150.0, "Weight of the MSE on [0, 1] images.", non_negative)
    lpips_weight: float = doc_field(1.0, "Weight of LPIPS (with `mse_lpips`).", non_negative)
    lam: float = doc_field(1.0, "Multiplier of the whole distortion term in the loss.", non_negative)


@dataclass
class RateSection:
    """The rate loss: target bitrate and the rate-targeting weights."""

    target_bpp: float = doc_field(0.14, "Target rate in bits per pixel.", positive)
    lam_below: float = doc_field(
        0.0625, "Rate weight for images whose rounded bpp is at or below the target.", non_negative
    )
    lam_above: float = doc_field(2.0, "Rate weight λ_b for images above the target.", non_negative)
    early_target_factor: float = doc_field(
        1.429, "Target multiplier before `switch_step` (official: 1.429).", positive
    )
    early_lam_factor: float = doc_field(0.5, "λ_b multiplier before `switch_step` (official: 0.5).", positive)
    switch_step: int = doc_field(
        25_000,
        "Iteration at which target and λ_b switch from their early to their final values (official: "
        "counted step 50,000, i.e. 25,000 iterations of two optimizer steps).",
        non_negative,
    )


@dataclass
class QuantileSection:
    lr: float = doc_field(
        1e-3, "AdamW learning rate of the entropy-bottleneck quantiles (constant; official: 1e-3).", positive
    )
    weight_decay: float = doc_field(
        0.01, "AdamW weight decay of the quantiles (official: torch's default, 0.01).", non_negative
    )


@dataclass
class PretrainConfig:
    """Stage 1: the HiFiC autoencoder trained for rate and distortion."""

    run: RunSection = doc_field(RunSection(), "Run folder, seed and resume behaviour.")
    data: DataSection = doc_field(DataSection(), "Image folders, crops and batches.")
    model: AutoencoderSection = doc_field(AutoencoderSection(), "The HiFiC autoencoder's sizes.")
    train: TrainSection = doc_field(TrainSection(), "Length, clipping and numerics of training.")
    optim: OptimSection = doc_field(OptimSection(), "The autoencoder's AdamW and LR schedule.")
    distortion: DistortionSection = doc_field(DistortionSection(), "The distortion loss.")
    lpips: LPIPSSection = doc_field(LPIPSSection(), "The LPIPS network of losses and metrics.")
    fid: FIDSection = doc_field(FIDSection(), "The Inception network of validation's FID.")
    rate: RateSection = doc_field(RateSection(), "HiFiC rate targeting.")
    quantiles: QuantileSection = doc_field(QuantileSection(), "The entropy bottleneck's quantile optimizer.")
    checkpoint: CheckpointSection = doc_field(
        CheckpointSection(), "Checkpoint cadence, retention and best.pt."
    )
    logging: LoggingSection = doc_field(LoggingSection(), "TensorBoard cadence and image grids.")

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
    """The VQ-VAE labeller's architecture."""

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
    """The VQ-VAE's losses: reconstruction, LPIPS, commitment and codebook."""

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
    """The VQ-VAE codebook: re-seeding dead codes."""

    reseed_dead: bool = doc_field(
        True, "Re-seed codes unused for `dead_after` steps from recent encoder outputs."
    )
    dead_after: int = doc_field(1000, "Steps without a hit after which a code counts as dead.", positive)
    reseed_every: int = doc_field(1000, "Check for dead codes every this many steps.", positive)


@dataclass
class VQVAEOptimSection:
    """The VQ-VAE's optimizer and learning-rate schedule."""

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

    run: RunSection = doc_field(RunSection(dir="runs/vqvae"), "Run folder, seed and resume behaviour.")
    data: DataSection = doc_field(
        DataSection(batch_size=16, val_max_images=256), "Image folders, crops and batches."
    )
    model: VQVAESection = doc_field(VQVAESection(), "The VQ-VAE's sizes and codebook.")
    train: TrainSection = doc_field(
        TrainSection(max_steps=300_000), "Length, clipping and numerics of training."
    )
    optim: VQVAEOptimSection = doc_field(VQVAEOptimSection(), "AdamW and LR schedule.")
    loss: VQVAELossSection = doc_field(VQVAELossSection(), "The VQ-VAE's loss terms.")
    codebook: CodebookSection = doc_field(CodebookSection(), "Dead-code re-seeding.")
    lpips: LPIPSSection = doc_field(LPIPSSection(), "The LPIPS network of losses and metrics.")
    checkpoint: CheckpointSection = doc_field(
        CheckpointSection(best_metric="val/psnr"), "Checkpoint cadence, retention and best.pt."
    )
    logging: LoggingSection = doc_field(LoggingSection(), "TensorBoard cadence and image grids.")

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
    """The weights stage 2 starts from: the stage-1 autoencoder and the stage-0 labeller."""

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
    """Which parts of the autoencoder stay frozen in stage 2."""

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
    """The conditional U-Net discriminator and what it predicts."""

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
    """The generator's and discriminator's optimizers."""

    lr: float = doc_field(1e-4, "AdamW learning rate of the generator (constant).", positive)
    betas: list[float] = doc_field([0.5, 0.9], "AdamW betas of the generator.")
    weight_decay: float = doc_field(0.0, "AdamW weight decay of the generator.", non_negative)
    disc_lr: float = doc_field(4e-4, "AdamW learning rate of the discriminator (constant).", positive)
    disc_betas: list[float] = doc_field([0.5, 0.9], "AdamW betas of the discriminator.")
    disc_weight_decay: float = doc_field(0.0, "AdamW weight decay of the discriminator.", non_negative)


@dataclass
class GANLossSection:
    """The adversarial (OASIS) loss and its weight."""

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

    run: RunSection = doc_field(RunSection(dir="runs/finetune"), "Run folder, seed and resume behaviour.")
    init: InitSection = doc_field(InitSection(), "Where the stage-1 autoencoder and the labeller come from.")
    data: DataSection = doc_field(DataSection(batch_size=16), "Image folders, crops and batches.")
    freeze: FreezeSection = doc_field(FreezeSection(), "Which autoencoder parts are trained.")
    discriminator: DiscriminatorSection = doc_field(
        DiscriminatorSection(), "The conditional U-Net discriminator."
    )
    train: TrainSection = doc_field(
        TrainSection(max_steps=100_000), "Length, clipping and numerics of training."
    )
    optim: GANOptimSection = doc_field(GANOptimSection(), "The generator's and discriminator's AdamW.")
    distortion: DistortionSection = doc_field(DistortionSection(), "The distortion loss.")
    lpips: LPIPSSection = doc_field(LPIPSSection(), "The LPIPS network of losses and metrics.")
    fid: FIDSection = doc_field(FIDSection(), "The Inception network of validation's FID.")
    rate: RateSection = doc_field(RateSection(switch_step=0), "HiFiC rate targeting.")
    gan: GANLossSection = doc_field(GANLossSection(), "The adversarial loss.")
    quantiles: QuantileSection = doc_field(
        QuantileSection(), "The quantile optimizer (runs only with freeze.bottleneck = false)."
    )
    checkpoint: CheckpointSection = doc_field(
        CheckpointSection(), "Checkpoint cadence, retention and best.pt."
    )
    logging: LoggingSection = doc_field(LoggingSection(), "TensorBoard cadence and image grids.")

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
