"""Training fidelity: our stage-1 and stage-2 iteration functions against one official iteration.

The golden file (`$ILLM_GOLDEN_TRAIN`, else `tests/reference/golden_train.pt`, a copy of the
shared one) records one official `TargetRateCompressionModule.training_step` and one
`GANCompressionModule.training_step`, run on name-seeded weights, real photo crops and a seeded
RNG; its README section (`tests/reference/README.md`) says what was run and how to compare.
Everything here is read from the file (salt, seed, crops, iteration, settings), so any file made
the same way must pass. The iterations run are the ones the training loops run
(`pretrain_iteration`, `finetune_iteration`), built from the released configs.
"""

import math
import os
import warnings
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from fill_weights import fill_

from illm import metrics
from illm.config import load_config
from illm.experiment import FinetuneConfig, PretrainConfig
from illm.losses import build_distortion, rate_schedule, targeted_rate
from illm.models.vqvae import VQVAE
from illm.optimizer import lr_schedule
from illm.stages.finetune import (
    PatchTargets,
    build_discriminator,
    finetune_iteration,
    freeze_autoencoder,
    freeze_labeller,
    latent_channels,
    num_classes,
)
from illm.stages.finetune import build_parts as build_finetune_parts
from illm.stages.pretrain import build_autoencoder, pretrain_iteration
from illm.stages.pretrain import build_parts as build_pretrain_parts

REPO = Path(__file__).resolve().parents[1]
GOLDEN_TRAIN = Path(os.environ.get("ILLM_GOLDEN_TRAIN") or REPO / "tests" / "reference" / "golden_train.pt")
UPDATE_ROUNDING = 2.0**-22  # two float32 roundings of a parameter, relative


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN_TRAIN.exists():
        pytest.fail(f"golden training file not found: {GOLDEN_TRAIN}")
    data = torch.load(GOLDEN_TRAIN, weights_only=True)
    if data.get("format") != "golden_train/1":
        pytest.fail(
            f"{GOLDEN_TRAIN}: format {data.get('format')!r}; this test reads one-iteration files "
            "(golden_train/1)"
        )
    return data


# --- comparisons, as the golden README measures them ---------------------------------------------------


class Report:
    """Collects every comparison; the test fails listing all that exceed their tolerance."""

    def __init__(self, tolerances: dict, strict: dict):
        self.tolerances, self.strict = tolerances, strict
        self.failures: list[str] = []
        self.worst: dict[str, float] = {}

    def check(self, metric: str, what: str, error: float) -> None:
        self.worst[metric] = max(self.worst.get(metric, 0.0), error)
        if not error <= self.tolerances[metric]:
            self.failures.append(f"{what}: {metric} error {error:.3g} > {self.tolerances[metric]:.3g}")

    def assert_ok(self) -> None:
        strict = {m: e for m, e in self.worst.items() if e > self.strict.get(m, math.inf)}
        print(f"worst errors: {self.worst}; above the strict set: {strict or 'none'}")
        assert not self.failures, "\n".join(self.failures)


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b != 0 else abs(a)


def compare_tensor(report: Report, kind: str, name: str, ours: torch.Tensor, digest: dict) -> None:
    """norm relative; sum against max(|sum|, norm); sampled values against the RMS."""
    ours = ours.detach().double().reshape(-1)
    assert ours.numel() == digest["numel"], f"{kind} {name}: {ours.numel()} values, golden {digest['numel']}"
    norm = digest["norm"]
    rms = norm / math.sqrt(digest["numel"]) if norm > 0 else 1.0
    report.check(f"{kind}.norm", f"{kind} {name}", relative(ours.norm().item(), norm))
    report.check(
        f"{kind}.sum",
        f"{kind} {name}",
        abs(ours.sum().item() - digest["sum"]) / max(abs(digest["sum"]), norm, 1e-30),
    )
    report.check(
        f"{kind}.val", f"{kind} {name}", (ours[digest["idx"]] - digest["val"]).abs().max().item() / rms
    )


def compare_step(
    report: Report,
    name: str,
    before: torch.Tensor,
    after: torch.Tensor,
    golden_after: dict,
    golden_update: dict,
) -> None:
    """Parameters after the step and the update: norms, and the sampled values where robust."""
    after, before = after.detach().double().reshape(-1), before.double().reshape(-1)
    update = after - before
    report.check(
        "params_after.norm", f"params_after {name}", relative(after.norm().item(), golden_after["norm"])
    )
    report.check(
        "updates.norm",
        f"updates {name}",
        relative(update.norm().item(), golden_update["norm"])
        if golden_update["norm"]
        else update.norm().item(),
    )
    robust, lr = golden_after["robust"], golden_after["lr"]
    if robust.any():
        idx = golden_after["idx"][robust]
        slack = UPDATE_ROUNDING * golden_after["val"][robust].abs()
        excess = ((after[idx] - golden_after["val"][robust]).abs() - slack).clamp(min=0) / lr
        report.check("params_after.val", f"params_after {name}", excess.max().item())
        excess = ((update[idx] - golden_update["val"][robust]).abs() - slack).clamp(min=0) / lr
        report.check("updates.val", f"updates {name}", excess.max().item())


def compare_logged(
    report: Report, ours: dict, golden_logged: dict, exact=("train/target", "train/lam2")
) -> None:
    for key, value in golden_logged.items():
        assert key in ours, f"the iteration does not log {key}"
        mine = float(ours[key].detach()) if isinstance(ours[key], torch.Tensor) else float(ours[key])
        if key in exact:
            assert mine == value, f"{key}: ours {mine}, official {value}"
        else:
            report.check("logged", key, relative(mine, value))


class GradientRecorder:
    """Gradients as each optimizer's step sees them (after clipping), via torch's public
    optimizer step pre-hooks, and the parameters before the step."""

    def __init__(self, optimizers: dict, names: dict):
        self.grads: dict[str, dict[str, torch.Tensor]] = {}
        self.before: dict[str, torch.Tensor] = {}
        for label, optimizer in optimizers.items():
            inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
            inner.register_step_pre_hook(self._hook(label, names))

    def _hook(self, label: str, names: dict):
        def record(optimizer, args, kwargs):
            grads = self.grads.setdefault(label, {})
            for group in optimizer.param_groups:
                for p in group["params"]:
                    grads[names[id(p)]] = None if p.grad is None else p.grad.detach().clone()
                    self.before[names[id(p)]] = p.detach().clone()

        return record


# --- building what the official run built ----------------------------------------------------------------


def fresh_accelerator() -> Accelerator:
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision="no", cpu=True)


def schedule_at(scheduler, iteration: int) -> None:
    """Put a fresh LR schedule at `iteration` (as if stepped that many times)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "scheduler.step() before optimizer.step()"
        scheduler.last_epoch = iteration - 1
        scheduler.step()


def lpips_filled(salt: str):
    network = metrics.lpips_network("alex", random_backbone=True)
    fill_(network.model, salt)
    return network


def rate_overrides(rate_target: dict, steps_per_iteration: int) -> list[str]:
    """Our `rate` section for an official TargetRateConfig with one switch (steps counted in
    Lightning optimizer steps, ours in iterations)."""
    assert len(rate_target["target_steps"]) == 1 and rate_target["target_steps"] == rate_target["lam2_steps"]
    assert rate_target["target_factors"][-1] == 1.0 and rate_target["lam2_factors"][-1] == 1.0
    return [
        f"rate.target_bpp={rate_target['target_bpp']}",
        f"rate.lam_below={rate_target['lam_levels'][0]}",
        f"rate.lam_above={rate_target['lam_levels'][1]}",
        f"rate.early_target_factor={rate_target['target_factors'][0]}",
        f"rate.early_lam_factor={rate_target['lam2_factors'][0]}",
        f"rate.switch_step={math.ceil(rate_target['target_steps'][0] / steps_per_iteration)}",
    ]


def check_released_rate(cfg, rate_target: dict, steps_per_iteration: int) -> None:
    expected = dict(
        override.removeprefix("rate.").split("=")
        for override in rate_overrides(rate_target, steps_per_iteration)
    )
    for key, value in expected.items():
        assert float(getattr(cfg.rate, key)) == float(value), (
            f"rate.{key}: released {getattr(cfg.rate, key)}, official {value}"
        )


def check_optimizer(name: str, optimizer, official: dict) -> None:
    group = optimizer.param_groups[0]
    for key in ("weight_decay", "eps"):
        assert group[key] == official[key], f"{name}.{key}: ours {group[key]}, official {official[key]}"
    assert list(group["betas"]) == list(official["betas"]), (
        f"{name}.betas: ours {group['betas']}, official {official['betas']}"
    )
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == official["num_params"], name


def batch(record: dict) -> torch.Tensor:
    return record["images_u8"].float() / 255.0  # as torchvision's ToTensor


# --- stage 1 ----------------------------------------------------------------------------------------------


@pytest.mark.slow  # full-size models: about 45 s together
def test_stage1_iteration_matches_official(golden):
    record, config = golden["stage1"], golden["stage1"]["config"]
    official = config["official_config"]
    iteration, per_iteration = config["iteration"], config["optimizer_steps_per_iteration"]
    assert config["global_step"] == per_iteration * iteration
    report = Report(golden["tolerances"], golden["tolerances_strict"])

    # The released config is the official recipe.
    cfg = load_config(
        PretrainConfig, REPO / "configs" / f"{official['rate_target']['target_bpp']}bpp.toml", []
    )
    check_released_rate(cfg, official["rate_target"], per_iteration)
    assert cfg.train.max_steps == official["trainer.max_steps"]  # counted steps / optimizers = iterations
    assert cfg.data.global_batch_size == official["ngpu"] * official["data.batch_size"]
    assert cfg.train.grad_clip == official["lightning_module"]["gradient_clip_val"]
    assert cfg.distortion.mse_weight == config["distortion_loss"]["mse_param"]
    assert cfg.distortion.lpips_weight == config["distortion_loss"]["lpips_param"]
    assert (
        cfg.distortion.lam == config["distortion_lam"]
        and cfg.lpips.net == config["distortion_loss"]["backbone"]
    )
    model_opt = config["optimizers"]["model_opt"]
    assert (cfg.optim.schedule, cfg.optim.lr) == ("ramp_quarter_cosine", model_opt["initial_lr"])
    assert cfg.optim.warmup_steps == model_opt["schedule_params"]["num_ramp_steps"]
    assert cfg.optim.decay_steps == model_opt["schedule_params"]["max_steps"]
    assert cfg.quantiles.lr == config["optimizers"]["quantile_opt"]["initial_lr"]

    model_cfg = config["model"]
    cfg.model.latent_channels, cfg.model.hyper_channels = (
        model_cfg["latent_features"],
        model_cfg["hyper_features"],
    )
    cfg.model.num_residual_blocks = model_cfg["num_residual_blocks"]
    model = fill_(build_autoencoder(cfg.model), config["salt"]["hific"]).train()
    distortion = build_distortion(cfg.distortion, lpips_filled(config["salt"]["lpips"]))
    parts = build_pretrain_parts(cfg, fresh_accelerator(), model, distortion)
    optimizer, aux_optimizer, scheduler = parts.optimizer, parts.aux_optimizer, parts.scheduler
    schedule_at(scheduler, iteration)
    check_optimizer("model_opt", optimizer, model_opt)
    check_optimizer("quantile_opt", aux_optimizer, config["optimizers"]["quantile_opt"])
    report.check("lr", "model_opt lr", relative(optimizer.param_groups[0]["lr"], model_opt["lr_used"]))
    report.check(
        "lr",
        "quantile_opt lr",
        relative(aux_optimizer.param_groups[0]["lr"], config["optimizers"]["quantile_opt"]["lr_used"]),
    )

    names = {id(p): n for n, p in model.named_parameters()}
    recorder = GradientRecorder({"model_opt": optimizer, "quantile_opt": aux_optimizer}, names)
    torch.manual_seed(config["seed"])
    result = pretrain_iteration(parts, [batch(record)], iteration)

    assert scheduler.last_epoch == iteration + 1
    compare_logged(report, {**result.logs, **result.quality()}, record["logged"])
    rate = result.extras["rate"]
    forward = record["forward"]
    for ours, key in (
        (rate.latent_bpp, "noisy_bpp_latent"),
        (rate.hyper_bpp, "noisy_bpp_hyper"),
        (rate.rounded_latent_bpp, "quantized_bpp_latent"),
        (rate.rounded_hyper_bpp, "quantized_bpp_hyper"),
    ):
        for mine, theirs in zip(ours.tolist(), forward[f"{key}_per_image"]):
            report.check("logged", f"{key} per image", relative(mine, theirs))
    report.check(
        "grad_norm_before_clip",
        "model_opt",
        relative(float(result.logs["optim/grad_norm"]), record["grad_norm_before_clip"]["model_opt"]),
    )
    quantile_grad = recorder.grads["quantile_opt"]["hyper_bottleneck.quantiles"]
    report.check(
        "grad_norm_before_clip",
        "quantiles",
        relative(quantile_grad.norm().item(), record["quantile_grad_norm"]),
    )
    for label, digests in record["grads"].items():
        assert set(recorder.grads[label]) == set(digests), (
            f"{label}: other parameters than the official optimizer's"
        )
        for name, digest in digests.items():
            compare_tensor(report, "grads", name, recorder.grads[label][name], digest)
    params = dict(model.named_parameters())
    for name, digest in record["params_after"].items():
        before = recorder.before.get(name)
        if before is None:  # not stepped by any optimizer (none in stage 1)
            pytest.fail(f"parameter {name} was not stepped")
        compare_step(report, name, before, params[name], digest, record["updates"][name])
    for key, ours in (
        ("image", result.out.images),
        ("latent", result.out.latent),
        ("hyper_latent", result.out.hyper_latent),
    ):
        compare_tensor(report, "forward", key, ours, forward[key])
    assert model.training and not distortion.lpips.net.training
    report.assert_ok()


# --- stage 2 ----------------------------------------------------------------------------------------------


@pytest.mark.slow  # full-size models: about 45 s together
def test_stage2_iteration_matches_official(golden):
    record, config = golden["stage2"], golden["stage2"]["config"]
    official = config["official_config"]
    iteration, per_iteration = config["iteration"], config["optimizer_steps_per_iteration"]
    report = Report(golden["tolerances"], golden["tolerances_strict"])
    rate_target = config["rate_target"]

    released = load_config(
        FinetuneConfig, REPO / "configs" / f"finetune_{rate_target['target_bpp']}bpp.toml", []
    )
    check_released_rate(released, config["rate_target_finetune_command"], per_iteration)
    assert released.train.max_steps == official["trainer.max_steps"]
    assert released.data.global_batch_size == official["ngpu"] * official["data.batch_size"]
    assert (
        released.data.batch_size == official["data.batch_size"]
        and released.gan.mc_sampling == config["mc_sampling"]
    )
    assert released.gan.generator_weight == config["generator_weight"]
    assert (released.freeze.encoder, released.freeze.bottleneck) == (True, True)
    # The golden step ran with the stage-1 rate target (see the README); the rest is the release.
    cfg = load_config(
        FinetuneConfig,
        REPO / "configs" / f"finetune_{rate_target['target_bpp']}bpp.toml",
        rate_overrides(rate_target, per_iteration) + ["data.batch_size=4"],
    )
    assert cfg.discriminator.context_channels == config["discriminator"]["context_out"]

    model_cfg = config["model"]
    hific_cfg = load_config(PretrainConfig, REPO / "configs" / "0.14bpp.toml", []).model
    hific_cfg.latent_channels, hific_cfg.hyper_channels = (
        model_cfg["latent_features"],
        model_cfg["hyper_features"],
    )
    hific_cfg.num_residual_blocks = model_cfg["num_residual_blocks"]
    model = freeze_autoencoder(fill_(build_autoencoder(hific_cfg), config["salt"]["hific"]), cfg.freeze)
    labeller = freeze_labeller(fill_(VQVAE(), config["salt"]["vqvae"]))
    discriminator = build_discriminator(cfg.discriminator, num_classes(labeller), latent_channels(model))
    assert discriminator.output_factor == config["discriminator"]["output_downsampling_factor"]
    fill_(discriminator, config["salt"]["discriminator"]).train()
    targets = PatchTargets(labeller, discriminator.output_factor)
    distortion = build_distortion(cfg.distortion, lpips_filled(config["salt"]["lpips"]))
    parts = build_finetune_parts(cfg, fresh_accelerator(), model, discriminator, distortion, targets)
    optimizer, disc_optimizer = parts.optimizer, parts.disc_optimizer
    assert parts.aux_optimizer is None  # the frozen quantiles have no optimizer, as officially
    for name, ours in (("model_opt", optimizer), ("discriminator_opt", disc_optimizer)):
        check_optimizer(name, ours, config["optimizers"][name])
        report.check(
            "lr", f"{name} lr", relative(ours.param_groups[0]["lr"], config["optimizers"][name]["lr_used"])
        )

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n in record["unchanged"]}
    names = {id(p): n for n, p in model.named_parameters()}
    names.update({id(p): n for n, p in discriminator.named_parameters()})
    recorder = GradientRecorder({"model_opt": optimizer, "discriminator_opt": disc_optimizer}, names)
    torch.manual_seed(config["seed"])
    result = finetune_iteration(parts, [batch(record)], iteration)

    # Labels and discriminator calls.
    for ours, key in ((result.extras["generator_targets"], "model"), (result.extras["real_targets"], "disc")):
        mismatch = int(((ours - 1) != record["labels"][key]).sum())
        report.check("labels_mismatch", f"labels {key}", mismatch)
    logits = {
        "generator_step": "generator_logits",
        "discriminator_fake": "fake_logits",
        "discriminator_real": "real_logits",
    }
    for call in record["discriminator_calls"]:
        compare_tensor(
            report, "forward", f"logits {call['role']}", result.extras[logits[call["role"]]], call["logits"]
        )

    compare_logged(report, {**result.logs, **result.quality()}, record["logged"])
    # The fine-tune command's own rate configuration: the same forward, another rate weighting.
    rate = result.extras["rate"]
    target, lam_above = rate_schedule(released.rate, iteration)
    command_rate = targeted_rate(rate.bpp, rate.rounded_bpp, target, released.rate.lam_below, lam_above)
    command_total = (
        result.logs["train/distortion_loss"].item()
        + float(command_rate)
        + cfg.gan.generator_weight * result.logs["train/generator_loss"].item()
    )
    compare_logged(
        report,
        {
            "train/rate_loss": command_rate,
            "train/total_model_loss": command_total,
            "train/target": target,
            "train/lam2": lam_above,
        },
        record["logged_finetune_command"],
    )

    grad_norms = {"model_opt": "optim/grad_norm", "discriminator_opt": "optim/disc_grad_norm"}
    for label, value in record["grad_norm_before_clip"].items():
        report.check("grad_norm_before_clip", label, relative(float(result.logs[grad_norms[label]]), value))
    for label, digests in record["grads"].items():
        assert set(recorder.grads[label]) == set(digests), (
            f"{label}: other parameters than the official optimizer's"
        )
        for name, digest in digests.items():
            compare_tensor(report, "grads", name, recorder.grads[label][name], digest)
    params = {**dict(model.named_parameters()), **dict(discriminator.named_parameters())}
    for group in ("model", "discriminator"):
        for name, digest in record["params_after"][group].items():
            compare_step(
                report, name, recorder.before[name], params[name], digest, record["updates"][group][name]
            )
    forward = record["forward"]
    for key, ours in (
        ("image", result.out.images),
        ("latent", result.out.latent),
        ("hyper_latent", result.out.hyper_latent),
    ):
        compare_tensor(report, "forward", key, ours, forward[key])

    # Frozen parts: bit-identical, no gradient, eval mode.
    params = dict(model.named_parameters())
    for name, digest in record["unchanged"].items():
        value = params[name].detach()
        assert params[name].grad is None, f"frozen {name} got a gradient"
        assert torch.equal(value, frozen[name]), f"frozen {name} changed"
        assert torch.equal(value.double().reshape(-1)[digest["idx"]], digest["val"]), (
            f"frozen {name} differs from the official fill"
        )
        assert abs(value.double().sum().item() - digest["sum"]) <= golden["tolerances"]["unchanged"] * max(
            1.0, abs(digest["sum"])
        )
    modes = {
        "encoder": model.encoder,
        "hyper_analysis": model.hyper_analysis,
        "hyper_bottleneck": model.hyper_bottleneck,
        "latent_bottleneck": model.latent_bottleneck,
        "decoder": model.decoder,
        "discriminator": discriminator,
        "latent_projector": labeller,
        "lpips": distortion.lpips.net,
    }
    for name, module in modes.items():
        assert module.training == config["module_modes"][f"{name}.training"], f"{name}.training"
    report.assert_ok()


# --- the LR factor curve ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "step", [0, 1, 5000, 9999, 10000, 10001, 250_000, 500_000, 999_999, 1_000_000, 1_010_000, 1_500_000]
)
def test_lr_factor_follows_the_official_formula(step):
    """The released stage-1 schedule against `RampCosineLRSchedule`'s formula, written out here."""
    cfg = load_config(PretrainConfig, REPO / "configs" / "0.14bpp.toml", [])
    ramp, length = cfg.optim.warmup_steps, cfg.optim.decay_steps
    if step < ramp:
        expected = max(min(step / ramp, 1.0), 1e-12)
    else:
        expected = max(math.cos((step - ramp) / length * math.pi / 2), 1e-12)
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=cfg.optim.lr)
    scheduler = lr_schedule(optimizer, cfg.optim.schedule, ramp, length)
    schedule_at(scheduler, step)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr * expected, rel=1e-12, abs=0)


def test_lr_factor_landmarks():
    """The numbers the recipe is quoted with: 0.72 at 500k iterations, 0.016 at 1M (cos(0.49 pi/2), cos(0.99 pi/2))."""
    from illm.optimizer import ramp_half_cosine, ramp_quarter_cosine

    assert ramp_quarter_cosine(500_000, 10_000, 1_000_000) == pytest.approx(0.7181, abs=1e-4)
    assert ramp_quarter_cosine(1_000_000, 10_000, 1_000_000) == pytest.approx(0.0157, abs=1e-4)
    assert ramp_half_cosine(1_000_000, 10_000, 1_000_000) == 0.0
