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

MIXED_PRECISION = ("no", "bf16", "fp16")
CROP_MODES = ("random_crop", "random_resized_crop")
LR_SCHEDULES = ("ramp_cosine", "constant")
LPIPS_NETS = ("alex", "vgg")
BACKBONE_WEIGHTS = ("pretrained", "random")


# --- sections shared by every stage -------------------------------------------------------------


@dataclass
class RunSection:
    dir: str = doc_field("runs/pretrain", "Run folder: checkpoints, TensorBoard events, resolved config.")
    seed: int = doc_field(18, "Seed of every random number generator (offset by process index).")
    resume: bool = doc_field(False, "Continue the run in `run.dir` even if its config differs (same config resumes anyway).")
    overwrite: bool = doc_field(False, "Start over in a `run.dir` that holds another run; its files are moved aside, not deleted.")


@dataclass
class DataSection:
    train: str = doc_field("", "Folder of training images, searched recursively (JPEG, PNG, WebP).")
    val: str = doc_field("", "Folder of validation images; empty disables validation.")
    crop_size: int = doc_field(256, "Training crop size in pixels (a multiple of 64).", multiple_of(64))
    crop_mode: str = doc_field("random_crop", "Training crop: reflect-padded random crop or random resized crop.", choices=CROP_MODES)
    batch_size: int = doc_field(8, "Training images per process and step.", positive)
    num_workers: int = doc_field(4, "Data loader worker processes per training process.", non_negative)
    val_crop_size: int = doc_field(256, "Validation images are resized and centre-cropped to this size.", multiple_of(64))
    val_batch_size: int = doc_field(4, "Validation images per process and batch.", positive)
    val_max_images: int = doc_field(256, "Validate on at most this many images (0 = all).", non_negative)


@dataclass
class CheckpointSection:
    every: int = doc_field(10000, "Save a checkpoint every this many steps (and at the end).", positive)
    keep_last: int = doc_field(3, "How many of the most recent checkpoints to keep.", positive)
    best_metric: str = doc_field("val/ms_ssim", "Validation metric that selects `best.pt` (empty: no best checkpoint).")
    best_mode: str = doc_field("max", "Whether a larger or smaller `best_metric` is better.", choices=("max", "min"))


@dataclass
class LoggingSection:
    every: int = doc_field(100, "Write training scalars to TensorBoard every this many steps.", positive)
    val_every: int = doc_field(10000, "Validate (metrics and image grids) every this many steps.", positive)
    num_images: int = doc_field(4, "Fixed training and validation images shown in the TensorBoard grids.", non_negative)


@dataclass
class LPIPSSection:
    net: str = doc_field("alex", "LPIPS backbone.", choices=LPIPS_NETS)
    backbone_weights: str = doc_field("pretrained", "`random` uses an untrained backbone (tests, offline demos): the LPIPS numbers are then not comparable.", choices=BACKBONE_WEIGHTS)


# --- stage 1: autoencoder pre-training ------------------------------------------------------------


@dataclass
class AutoencoderSection:
    latent_channels: int = doc_field(220, "Channels of the latent y (official: 220).", positive)
    hyper_channels: int = doc_field(320, "Channels of the hyper-latent z (official: 320).", positive)
    encoder_channels: list[int] = doc_field([60, 120, 240, 480, 960], "Encoder widths, first conv then the four stride-2 convs (the generator mirrors them).", all_positive)
    num_residual_blocks: int = doc_field(9, "Residual blocks in the generator (official: 9).", positive)


@dataclass
class TrainSection:
    max_steps: int = doc_field(1_000_000, "Training iterations (one optimizer step of the model each).", positive)
    grad_accum_steps: int = doc_field(1, "Micro-batches accumulated per optimizer step.", positive)
    grad_clip: float = doc_field(1.0, "Clip the gradient norm of the trained model to this (0 = off).", non_negative)
    mixed_precision: str = doc_field("no", "Autocast precision of the networks; entropy models and the rate loss stay float32.", choices=MIXED_PRECISION)


@dataclass
class OptimSection:
    lr: float = doc_field(3e-4, "AdamW learning rate of the autoencoder.", positive)
    weight_decay: float = doc_field(5e-5, "AdamW weight decay of the autoencoder.", non_negative)
    betas: list[float] = doc_field([0.9, 0.999], "AdamW betas of the autoencoder.")
    schedule: str = doc_field("ramp_cosine", "Learning-rate schedule: linear warm-up then cosine decay to 0, or constant.", choices=LR_SCHEDULES)
    warmup_steps: int = doc_field(10_000, "Linear warm-up iterations of `ramp_cosine`.", non_negative)
    decay_steps: int = doc_field(1_000_000, "Iteration at which `ramp_cosine` reaches 0.", positive)
    aux_lr: float = doc_field(1e-3, "AdamW learning rate of the entropy-bottleneck quantiles (constant).", positive)


@dataclass
class DistortionSection:
    kind: str = doc_field("mse_lpips", "Distortion loss.", choices=("mse", "mse_lpips"))
    mse_weight: float = doc_field(150.0, "Weight of the MSE on [0, 1] images.", non_negative)
    lpips_weight: float = doc_field(1.0, "Weight of LPIPS (with `mse_lpips`).", non_negative)
    lam: float = doc_field(1.0, "Multiplier of the whole distortion term in the loss.", non_negative)


@dataclass
class RateSection:
    target_bpp: float = doc_field(0.14, "Target rate in bits per pixel.", positive)
    lam_below: float = doc_field(0.0625, "Rate weight for images whose rounded bpp is at or below the target.", non_negative)
    lam_above: float = doc_field(2.0, "Rate weight λ_b for images above the target.", non_negative)
    warmup_target_factor: float = doc_field(1.429, "Target multiplier before `warmup_steps`.", positive)
    warmup_lam_factor: float = doc_field(0.5, "λ_b multiplier before `warmup_steps`.", positive)
    warmup_steps: int = doc_field(25_000, "Iteration at which target and λ_b switch to their final values.", non_negative)


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
        if len(self.optim.betas) != 2 or not all(0 <= b < 1 for b in self.optim.betas):
            raise ConfigError(f"key 'optim.betas': must be two numbers in [0, 1), got {self.optim.betas}")
        if len(self.model.encoder_channels) != 5:
            raise ConfigError(f"key 'model.encoder_channels': must have 5 entries, got {self.model.encoder_channels}")
        if self.optim.schedule == "ramp_cosine" and self.optim.warmup_steps >= self.optim.decay_steps:
            raise ConfigError("key 'optim.warmup_steps': must be smaller than 'optim.decay_steps'")
