"""Stage 0: train the VQ-VAE whose codes label real image patches for the MS-ILLM discriminator.

    accelerate launch scripts/train_vqvae.py configs/vqvae_xcit_p8_ch64_cb1024_h8.toml data.train=DIR data.val=DIR

Per iteration: forward, loss = reconstruction (L1 or MSE) + LPIPS + β·commitment + codebook
term, backward, clip, optimizer and LR-schedule step. Then the codebook upkeep, identical on
every process: the step's hit counts of all processes are summed into every process's counters,
a few encoder outputs of every process join a shared buffer of recent latents, and every
`codebook.reseed_every` steps the codes without a hit for `codebook.dead_after` steps are moved
onto latents drawn from that buffer with a generator seeded by the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn

from illm.checkpoint import TrainingState
from illm.config import load_config
from illm.data import TrainingData
from illm.distributed import sync_context
from illm.divergence import check_finite
from illm.entry import parse_args
from illm.experiment import VQVAEConfig
from illm.faults import lost_peers
from illm.iteration import IterationResult
from illm.loop import TrainingLog
from illm.losses import build_lpips
from illm.models.vqvae import VQVAE, VQVAEOutput
from illm.optimizer import adamw, clip_gradients, lr_schedule
from illm.run import finish_run, resume, start_run, stop_after_checkpoint
from illm.sweep import USAGE_LINE, stage_cli
from illm.validation import SampleMeans, evaluating, image_quality, pooled_quality, validation_images

USAGE = "usage: accelerate launch scripts/train_vqvae.py CONFIG.toml [section.key=value ...]\n" + USAGE_LINE

# The recent-latent buffer holds this many vectors per code, so that even a fully dead codebook
# can be re-seeded from distinct vectors.
RECENT_VECTORS_PER_CODE = 4
PALETTE_SEED = 0


def build_vqvae(model_cfg) -> VQVAE:
    return VQVAE(
        ch=model_cfg.ch,
        ch_mult=tuple(model_cfg.ch_mult),
        num_res_blocks=model_cfg.num_res_blocks,
        attention_levels=tuple(model_cfg.attention_levels),
        embed_dim=model_cfg.embed_dim,
        codebook_size=model_cfg.codebook_size,
        codebook_dim=model_cfg.codebook_dim,
    )


def vqvae_loss(
    out: VQVAEOutput, images: Tensor, loss_cfg, lpips: nn.Module | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted training loss and its unweighted terms (named `l1`/`mse`, `lpips`, `commitment`, `codebook`)."""
    pixel_loss = F.l1_loss if loss_cfg.reconstruction == "l1" else F.mse_loss
    reconstruction = pixel_loss(out.images.float(), images.float())
    terms = {
        loss_cfg.reconstruction: reconstruction,
        "commitment": out.commitment_loss,
        "codebook": out.codebook_loss,
    }
    loss = (
        loss_cfg.reconstruction_weight * reconstruction
        + loss_cfg.commitment_beta * out.commitment_loss
        + loss_cfg.codebook_weight * out.codebook_loss
    )
    if lpips is not None and loss_cfg.lpips_weight > 0:
        terms["lpips"] = lpips(out.images, images).mean()
        loss = loss + loss_cfg.lpips_weight * terms["lpips"]
    return loss, terms


# --- codebook upkeep ----------------------------------------------------------------------------


class CodebookKeeper(nn.Module):
    """Codebook upkeep state, identical on every process and saved in the checkpoints.

    Buffers: `last_hit_step` (the step at which each code was last picked by any process) and
    a ring buffer `recent` of encoder outputs gathered from all processes (`num_seen` counts
    the vectors ever written), which dead codes are re-seeded from.
    """

    def __init__(self, num_codes: int, code_dim: int, capacity: int):
        super().__init__()
        self.register_buffer("last_hit_step", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("recent", torch.zeros(capacity, code_dim))
        self.register_buffer("num_seen", torch.zeros((), dtype=torch.long))

    def record_hits(self, counts: Tensor, step: int) -> None:
        self.last_hit_step[counts > 0] = step

    def dead_codes(self, step: int, dead_after: int) -> Tensor:
        """Mask of the codes without a hit in the last `dead_after` steps."""
        return step - self.last_hit_step >= dead_after

    def revive(self, codes: Tensor, step: int) -> None:
        """Give re-seeded codes a fresh `dead_after` steps to be picked."""
        self.last_hit_step[codes] = step

    def remember(self, vectors: Tensor) -> None:
        """Append N x D vectors to the ring buffer, overwriting the oldest."""
        capacity = len(self.recent)
        vectors = vectors[-capacity:]
        slots = (self.num_seen + torch.arange(len(vectors), device=self.recent.device)) % capacity
        self.recent[slots] = vectors.to(self.recent)
        self.num_seen += len(vectors)

    def recent_latents(self) -> Tensor:
        """The buffered vectors (fewer than the capacity until it has filled)."""
        return self.recent[: min(int(self.num_seen), len(self.recent))]


def share_hits(accelerator, vqvae: VQVAE, hits_before: Tensor) -> Tensor:
    """Add the other processes' hits of this step to this process's hit counters.

    Every process counted only its own images since `hits_before`; afterwards all processes
    hold the same counts. Returns the step's hit count per code, summed over processes.
    """
    hits = vqvae.quantizer.codebook_hits_0
    step_hits = accelerator.reduce(hits - hits_before, reduction="sum")
    hits.copy_(hits_before + step_hits)
    return step_hits


def sample_latents(latent: Tensor, count: int) -> Tensor:
    """`count` latent vectors (count x D) drawn at random positions of a B x D x h x w latent."""
    vectors = latent.detach().float().permute(0, 2, 3, 1).flatten(0, 2)
    return vectors[torch.randint(len(vectors), (count,), device=vectors.device)]


def reseed_dead_codes(vqvae: VQVAE, keeper: CodebookKeeper, step: int, cfg: VQVAEConfig) -> int:
    """Move the dead codes onto recent latents; the same on every process (shared buffer,
    generator seeded by the run seed and the step). Returns how many codes moved."""
    dead = keeper.dead_codes(step, cfg.codebook.dead_after)
    generator = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + step)
    reseeded = vqvae.reseed_dead_codes(keeper.recent_latents(), dead, generator)
    if reseeded:
        keeper.revive(dead, step)
    return reseeded


def codebook_logs(prefix: str, usage: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{name}": value for name, value in usage.items()}


# --- validation and images ------------------------------------------------------------------------


def validate_vqvae(run, model, val_loader, lpips, loss_cfg) -> dict[str, float]:
    """Reconstruction metrics and codebook usage over the validation set, over all processes
    (each image counted once: `SampleMeans`)."""
    accelerator = run.accelerator
    vqvae = accelerator.unwrap_model(model)
    pixel_loss = F.l1_loss if loss_cfg.reconstruction == "l1" else F.mse_loss
    averages = SampleMeans(accelerator)
    code_counts = torch.zeros(vqvae.num_codes, dtype=torch.long)
    with evaluating(vqvae):
        for images, valid in validation_images(val_loader):
            with accelerator.autocast():
                out = vqvae(images)
            pixel_error = pixel_loss(out.images.float(), images, reduction="none").flatten(1).mean(1)
            per_image = {
                **image_quality(out.images.float().clamp(0, 1), images, lpips),
                f"val/{loss_cfg.reconstruction}": pixel_error,
            }
            averages.add(per_image, valid)
            code_counts += vqvae.code_counts(averages.gather_valid(out.indices, valid)).cpu()
    results = pooled_quality(averages.means())
    if not results:
        return {}
    # codebook_usage reads indices: rebuild an index multiset with the summed counts.
    all_indices = torch.repeat_interleave(torch.arange(vqvae.num_codes), code_counts)
    results.update(codebook_logs("val/codebook", vqvae.codebook_usage(all_indices)))
    return results


def label_palette(num_codes: int) -> Tensor:
    """A fixed random colour (num_codes x 3, in [0, 1]) per code, the same in every run."""
    return torch.rand(num_codes, 3, generator=torch.Generator().manual_seed(PALETTE_SEED))


def label_map(indices: Tensor, palette: Tensor, factor: int) -> Tensor:
    """B x h x w code indices -> B x 3 x h*factor x w*factor image, one palette colour per patch."""
    colours = palette.to(indices.device)[indices].permute(0, 3, 1, 2)
    return F.interpolate(colours, scale_factor=factor, mode="nearest")


def log_images(run, vqvae: VQVAE, fixed: dict[str, Tensor | None], palette: Tensor, step: int) -> None:
    """Input next to reconstruction for the fixed images, and the labels of the validation ones."""
    with evaluating(vqvae):
        for split, images in fixed.items():
            if images is None:
                continue
            images = images.to(run.accelerator.device)
            out = vqvae(images)
            run.logger.image_pairs(f"{split}/input_vs_reconstruction", images, out.images, step)
            if split == "val":
                labels = label_map(out.indices, palette, vqvae.downsampling_factor)
                run.logger.image_pairs("val/input_vs_labels", images, labels, step)


# --- one iteration ---------------------------------------------------------------------------------


@dataclass
class VQVAEParts:
    """What one stage-0 iteration works on. `model` may be wrapped by `accelerator.prepare`."""

    cfg: VQVAEConfig
    accelerator: Accelerator
    model: nn.Module
    optimizer: object
    scheduler: object
    keeper: CodebookKeeper
    lpips: nn.Module | None


def vqvae_iteration(parts: VQVAEParts, batches: list[Tensor], step: int) -> IterationResult:
    """One training iteration on the micro-batches `batches`, then the codebook upkeep;
    `step` iterations have been done before it."""
    cfg, accelerator, model = parts.cfg, parts.accelerator, parts.model
    vqvae = accelerator.unwrap_model(model)
    hits_before = vqvae.code_counts()
    lr = parts.optimizer.param_groups[0]["lr"]  # the schedule steps within the iteration
    for index, images in enumerate(batches):
        with sync_context(accelerator, model, index == len(batches) - 1), accelerator.autocast():
            out = model(images)
            loss, terms = vqvae_loss(out, images, cfg.loss, parts.lpips)
        accelerator.backward(loss / len(batches))
    grad_norm = clip_gradients(accelerator, model.parameters(), cfg.train.grad_clip)
    parts.optimizer.step()
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    done = step + 1  # iterations done once this one is

    # --- codebook upkeep: the same on every process ---
    parts.keeper.record_hits(share_hits(accelerator, vqvae, hits_before), done)
    logs = {
        "train/loss": loss,
        **{f"train/{k}": v for k, v in terms.items()},
        "optim/lr": lr,
        "optim/grad_norm": grad_norm,
    }
    if cfg.codebook.reseed_dead:
        parts.keeper.remember(accelerator.gather(sample_latents(out.latent, cfg.data.batch_size)))
        if done % cfg.codebook.reseed_every == 0:
            logs["codebook/reseeded_codes"] = reseed_dead_codes(vqvae, parts.keeper, done, cfg)
    return IterationResult(logs, out, images)


# --- the loop ---------------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    config_path, overrides = parse_args(argv, USAGE, VQVAEConfig)
    cfg = load_config(VQVAEConfig, config_path, overrides)
    with lost_peers(cfg.run.dir):
        train(cfg)


def train(cfg: VQVAEConfig) -> VQVAE:
    """Run (or resume) stage 0 as `cfg` says; returns the trained VQ-VAE (unwrapped)."""
    data = TrainingData(cfg)  # bad folders are refused before any process starts
    lpips = build_lpips(cfg.lpips, needed=cfg.loss.lpips_weight > 0 or data.val_set is not None)
    # Each process counts its own codebook hits (summed by `share_hits`): DDP must not
    # overwrite them with the main process's counts before every forward.
    run = start_run(cfg, "vqvae", broadcast_buffers=False)
    data.prepare(run.accelerator)
    parts = build_parts(cfg, run.accelerator, lpips)
    vqvae = run.accelerator.unwrap_model(parts.model)
    state = TrainingState(
        models={"vqvae": parts.model, "codebook_keeper": parts.keeper},
        optimizers={"model": parts.optimizer},
        schedulers={"model": parts.scheduler},
        stream=data.stream,
        learning_rates={"model": cfg.optim.lr},
    )
    step = resume(run, state)
    log = TrainingLog(run, data, step, shown={"loss": "train/loss"})
    parts.model.train()
    while step < cfg.train.max_steps:
        log_due = log.due(step + 1)
        result = vqvae_iteration(parts, data.next_micro_batches(), step)
        step += 1
        stopping = run.stop.requested()  # SIGTERM or SIGUSR1 on any process
        if "codebook/reseeded_codes" in result.logs:
            run.logger.scalars({"codebook/reseeded_codes": result.logs.pop("codebook/reseeded_codes")}, step)
        if log_due or run.checkpoints.due(step) or stopping:
            check_finite(run, step, result.logs, state.models)
        if log_due:
            log.write(step, {**result.logs, **codebook_status(vqvae, parts.keeper, step, cfg)})
        val_metrics = None
        if log.validation_due(step):
            val_metrics = validate_and_show(run, parts, data, step)
        if run.checkpoints.due(step) or stopping:
            run.checkpoints.save(step, state, val_metrics)
        if stopping:
            stop_after_checkpoint(run, step)
    log.close()
    finish_run(run, step)
    return vqvae


def build_parts(cfg: VQVAEConfig, accelerator: Accelerator, lpips) -> VQVAEParts:
    """The VQ-VAE, its codebook keeper, optimizer and LR schedule, prepared for `accelerator`."""
    model = build_vqvae(cfg.model)
    keeper = CodebookKeeper(
        cfg.model.codebook_size, cfg.model.codebook_dim, RECENT_VECTORS_PER_CODE * cfg.model.codebook_size
    )
    keeper.to(accelerator.device)
    optim = cfg.optim
    optimizer = adamw(
        model.parameters(), optim.lr, optim.weight_decay, optim.betas, cfg.train.fused_optimizer
    )
    scheduler = lr_schedule(optimizer, optim.schedule, optim.warmup_steps, optim.decay_steps)
    lpips = lpips.to(accelerator.device) if lpips is not None else None
    model, optimizer = accelerator.prepare(model, optimizer)
    return VQVAEParts(cfg, accelerator, model, optimizer, scheduler, keeper, lpips)


def codebook_status(vqvae: VQVAE, keeper: CodebookKeeper, step: int, cfg: VQVAEConfig) -> dict:
    """codebook/dead_codes: unused since the last log; stale_codes: unused for `dead_after` steps."""
    usage = vqvae.codebook_usage()  # the hits of all processes since the last log
    vqvae.reset_codebook_hits()
    stale = keeper.dead_codes(step, cfg.codebook.dead_after).sum()
    return {**codebook_logs("codebook", usage), "codebook/stale_codes": stale}


def validate_and_show(run, parts: VQVAEParts, data: TrainingData, step: int) -> dict | None:
    """Validation metrics (None without a validation folder) and the fixed images' grids."""
    val_metrics = None
    if data.val_loader is not None:
        val_metrics = validate_vqvae(run, parts.model, data.val_loader, parts.lpips, parts.cfg.loss)
        run.logger.scalars(val_metrics, step)
    if run.accelerator.is_main_process:
        vqvae = run.accelerator.unwrap_model(parts.model)
        log_images(run, vqvae, data.fixed, label_palette(vqvae.num_codes), step)
    return val_metrics


def cli(argv=None) -> None:
    """`scripts/train_vqvae.py`: one run, or one per value of each `--sweep`."""
    stage_cli("train_vqvae.py", main, VQVAEConfig, USAGE, argv)
