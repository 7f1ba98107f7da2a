"""Training fidelity: our stage-1 and stage-2 iteration functions against the official iterations.

A golden file records official `TargetRateCompressionModule.training_step`s and
`GANCompressionModule.training_step`s, run on name-seeded weights, real photo crops and a seeded
RNG; the shared reference README says what was run and how to compare. Two formats:
`golden_train/1` (one iteration per stage) and `golden_train_multi/1` (K iterations in a row, with
the AdamW state after the last). Stage 2 comes in two variants (`stage2_variant`): `frozen`
(encoder and entropy models frozen; files without the key) and `unfrozen` (everything of the
autoencoder trains, with a quantile optimizer: the official README's command as it really runs).

`$ILLM_GOLDEN_TRAIN` names one file to check; unset, every `tests/reference/golden_train*.pt`
is checked. Everything is read from the file (salt, seeds, crops, first iteration, number of
iterations, settings), so any file made the same way must pass. The iterations run are the ones the
training loops run (`pretrain_iteration`, `finetune_iteration`), built from the released configs,
K times in a row on the same parts (nothing rebuilt in between).
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

from helpers.paths import REFERENCE_DIR, REPO
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
from illm.step_metrics import reduce_logs

UPDATE_ROUNDING = 2.0**-22  # two float32 roundings of a parameter, relative
SINGLE, MULTI = "golden_train/1", "golden_train_multi/1"


def golden_files() -> list[Path]:
    """`$ILLM_GOLDEN_TRAIN`, else every golden training file under tests/reference/."""
    chosen = os.environ.get("ILLM_GOLDEN_TRAIN")
    if chosen:
        return [Path(chosen)]
    return sorted(REFERENCE_DIR.glob("golden_train*.pt"))


@pytest.fixture(scope="module", params=golden_files(), ids=lambda path: path.name)
def golden(request):
    path = request.param
    if not path.exists():
        pytest.fail(f"golden training file not found: {path}")
    data = torch.load(path, weights_only=True)
    if data.get("format") not in (SINGLE, MULTI):
        pytest.fail(f"{path}: format {data.get('format')!r}; this test reads {SINGLE} and {MULTI} files")
    return as_multi(data)


def as_multi(data: dict) -> dict:
    """A one-iteration file in the multi-iteration layout: one iteration record per stage, its
    tolerances for iteration 0 and for the final state (which is the state after iteration 0)."""
    data.setdefault("stage2_variant", "frozen")
    if data["format"] == MULTI:
        return data
    per_iteration = {"iteration", "seed", "images_u8", "logged", "logged_finetune_command",
                     "grad_norm_before_clip", "quantile_grad_norm", "grads", "updates", "forward",
                     "labels", "discriminator_calls"}  # fmt: skip
    for stage in ("stage1", "stage2"):
        record, config = data[stage], data[stage]["config"]
        iteration = {key: record[key] for key in per_iteration if key in record}
        iteration.update(
            iteration=config["iteration"],
            seed=config["seed"],
            global_step=config["global_step"],
            lr_used={name: opt["lr_used"] for name, opt in config["optimizers"].items()},
            schedule_last_epoch={
                name: opt["schedule_last_epoch"] for name, opt in config["optimizers"].items()
            },
        )
        record["iterations"] = [iteration]
    data["num_iterations"] = 1
    data["tolerances_by_iteration"] = [data["tolerances"]]
    data["tolerances_strict_by_iteration"] = [data["tolerances_strict"]]
    data["tolerances_final"], data["tolerances_strict_final"] = data["tolerances"], data["tolerances_strict"]
    return data


# --- comparisons, as the golden README measures them ---------------------------------------------------


class Report:
    """Collects every comparison of one tolerance set (an iteration's, or the final state's)."""

    def __init__(self, label: str, tolerances: dict, strict: dict):
        self.label, self.tolerances, self.strict = label, tolerances, strict
        self.failures: list[str] = []
        self.worst: dict[str, float] = {}
        self.worst_what: dict[str, str] = {}

    def check(self, metric: str, what: str, error: float) -> None:
        if error >= self.worst.get(metric, 0.0):
            self.worst[metric], self.worst_what[metric] = error, what
        if not error <= self.tolerances[metric]:
            self.failures.append(
                f"{self.label}: {what}: {metric} error {error:.3g} > {self.tolerances[metric]:.3g}"
            )

    def strict_excess(self) -> dict[str, str]:
        return {
            m: f"{e:.3g} ({self.worst_what[m]})"
            for m, e in self.worst.items()
            if e > self.strict.get(m, math.inf)
        }


class Reports:
    """One `Report` per iteration and one for the final state; the test fails listing every
    comparison over its tolerance, and prints the worst errors and those above the strict sets."""

    def __init__(self, golden: dict):
        self.golden = golden
        self.all: list[Report] = []

    def iteration(self, k: int) -> Report:
        golden = self.golden
        by_iteration, strict = golden["tolerances_by_iteration"], golden["tolerances_strict_by_iteration"]
        index = min(k, len(by_iteration) - 1)  # later iterations reuse the last set (the README's rule)
        return self._add(Report(f"iteration {k}", by_iteration[index], strict[index]))

    def final(self) -> Report:
        golden = self.golden
        return self._add(Report("final", golden["tolerances_final"], golden["tolerances_strict_final"]))

    def _add(self, report: Report) -> Report:
        self.all.append(report)
        return report

    def assert_ok(self) -> None:
        for report in self.all:
            print(f"{report.label}: worst errors {report.worst}; above the strict set: "
                  f"{report.strict_excess() or 'none'}")  # fmt: skip
        failures = [failure for report in self.all for failure in report.failures]
        assert not failures, "\n".join(failures)


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


def robust_sample(digest: dict, fallback: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(robust sampled indices, their mask, lr) of an update digest; a one-iteration file keeps
    `robust` and `lr` in the parameter's `params_after` digest only."""
    robust = digest.get("robust", fallback["robust"])
    return digest["idx"][robust], robust, digest.get("lr", fallback["lr"])


def compare_update(
    report: Report, name: str, before: torch.Tensor, after: torch.Tensor, golden_update: dict, golden_after_k
) -> None:
    """One iteration's update: its norm, and the sampled values where robust, within two float32
    roundings of the parameter after this iteration (`golden_after_k`, at the sampled positions)."""
    update = after.detach().double().reshape(-1) - before.double().reshape(-1)
    report.check(
        "updates.norm",
        f"updates {name}",
        relative(update.norm().item(), golden_update["norm"])
        if golden_update["norm"]
        else update.norm().item(),
    )
    robust, lr = golden_update["robust"], golden_update["lr"]
    if robust.any():
        slack = UPDATE_ROUNDING * golden_after_k[robust].abs()
        difference = (update[golden_update["idx"][robust]] - golden_update["val"][robust]).abs()
        report.check("updates.val", f"updates {name}", ((difference - slack).clamp(min=0) / lr).max().item())


def compare_params_after(
    report: Report, name: str, after: torch.Tensor, digest: dict, iterations: int
) -> None:
    """The parameter after the last iteration: norm, and the robust sampled values within K
    float32 roundings, in units of the summed learning rates."""
    after = after.detach().double().reshape(-1)
    report.check("params_after.norm", f"params_after {name}", relative(after.norm().item(), digest["norm"]))
    robust = digest["robust"]
    if robust.any():
        slack = iterations * UPDATE_ROUNDING * digest["val"][robust].abs()
        difference = (after[digest["idx"][robust]] - digest["val"][robust]).abs()
        report.check(
            "params_after.val",
            f"params_after {name}",
            ((difference - slack).clamp(min=0) / digest["lr"]).max().item(),
        )


def params_after_each_iteration(iterations: list[dict], params_after: dict, group) -> list[dict]:
    """Per iteration k, {name: golden parameter values at the sampled positions after iteration k}:
    the final values minus the later iterations' sampled updates (exact in float64)."""
    values = {name: digest["val"].clone() for name, digest in params_after.items()}
    result = []
    for record in reversed(iterations):
        result.append(dict(values))
        updates = record["updates"] if group is None else record["updates"][group]
        values = {name: value - updates[name]["val"] for name, value in values.items()}
    return list(reversed(result))


def with_robustness(updates: dict, params_after: dict) -> dict:
    """Update digests with `robust` and `lr` (a one-iteration file keeps them in `params_after`)."""
    return {
        name: {**params_after[name], **digest} if "robust" not in digest else digest
        for name, digest in updates.items()
    }


def compare_logged(
    report: Report, ours: dict, golden_logged: dict, exact=("train/target", "train/lam2")
) -> None:
    for key, value in golden_logged.items():
        assert key in ours, f"the iteration does not log {key}"
        mine = float(ours[key])
        if key in exact:
            assert mine == value, f"{key}: ours {mine}, official {value}"
        else:
            report.check("logged", key, relative(mine, value))


def inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper


class GradientRecorder:
    """Gradients as each optimizer's step sees them (after clipping), via torch's public
    optimizer step pre-hooks, and the parameters before the step; `clear()` between iterations."""

    def __init__(self, optimizers: dict, names: dict):
        self.grads: dict[str, dict[str, torch.Tensor]] = {}
        self.before: dict[str, torch.Tensor] = {}
        for label, optimizer in optimizers.items():
            inner(optimizer).register_step_pre_hook(self._hook(label, names))

    def clear(self) -> None:
        self.grads, self.before = {}, {}

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


def logged_values(accelerator: Accelerator, result) -> dict[str, float]:
    """The iteration's logs as the loop logs them (`train/psnr` pooled from `train/mse`)."""
    return reduce_logs(accelerator, result.logs)


def check_lrs(report: Report, optimizers: dict, lr_used: dict) -> None:
    for label, optimizer in optimizers.items():
        report.check("lr", f"{label} lr", relative(optimizer.param_groups[0]["lr"], lr_used[label]))


def compare_grads(report: Report, recorder: GradientRecorder, golden_grads: dict) -> None:
    for label, digests in golden_grads.items():
        assert set(recorder.grads[label]) == set(digests), (
            f"{label}: other parameters than the official optimizer's"
        )
        for name, digest in digests.items():
            compare_tensor(report, "grads", name, recorder.grads[label][name], digest)


def compare_forward(report: Report, result, forward: dict) -> None:
    for key, ours in (
        ("image", result.forward.images),
        ("latent", result.forward.latent),
        ("hyper_latent", result.forward.hyper_latent),
    ):
        compare_tensor(report, "forward", key, ours, forward[key])
    rate = result.rate
    for ours, key in (
        (rate.latent_bpp, "noisy_bpp_latent"),
        (rate.hyper_bpp, "noisy_bpp_hyper"),
        (rate.rounded_latent_bpp, "quantized_bpp_latent"),
        (rate.rounded_hyper_bpp, "quantized_bpp_hyper"),
    ):
        for mine, theirs in zip(ours.tolist(), forward[f"{key}_per_image"]):
            report.check("logged", f"{key} per image", relative(mine, theirs))


def compare_optimizer_state(report: Report, optimizers: dict, golden_state: dict, names: dict) -> None:
    """AdamW's state after the last iteration: the step count exactly, both moments as gradients."""
    for label, states in golden_state.items():
        ours = {names[id(p)]: state for p, state in inner(optimizers[label]).state.items()}
        assert set(ours) == set(states), f"{label}: state for other parameters than the official optimizer's"
        for name, golden in states.items():
            report.check(
                "optimizer_state.step",
                f"{label} {name} step",
                abs(float(ours[name]["step"]) - golden["step"]),
            )
            for moment in ("exp_avg", "exp_avg_sq"):
                compare_tensor(report, f"optimizer_state.{moment}", name, ours[name][moment], golden[moment])


# --- stage 1 ----------------------------------------------------------------------------------------------


@pytest.mark.slow  # full-size models: about 45 s per iteration
def test_stage1_iterations_match_official(golden):
    record, config = golden["stage1"], golden["stage1"]["config"]
    official = config["official_config"]
    iteration, per_iteration = config["iteration"], config["optimizer_steps_per_iteration"]
    assert config["global_step"] == per_iteration * iteration
    reports = Reports(golden)

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
    optimizers = {"model_opt": parts.optimizer, "quantile_opt": parts.aux_optimizer}
    assert list(optimizers) == config["optimizer_order"]
    scheduler = parts.scheduler
    schedule_at(scheduler, iteration)
    for label, optimizer in optimizers.items():
        check_optimizer(label, optimizer, config["optimizers"][label])

    names = {id(p): n for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    recorder = GradientRecorder(optimizers, names)
    iterations = record["iterations"]
    after_each = params_after_each_iteration(iterations, record["params_after"], None)
    for k, golden_iteration in enumerate(iterations):  # back to back, on the same parts
        report = reports.iteration(k)
        assert golden_iteration["iteration"] == iteration + k
        assert golden_iteration["global_step"] == per_iteration * (iteration + k)
        assert scheduler.last_epoch == golden_iteration["schedule_last_epoch"]["model_opt"]
        check_lrs(report, optimizers, golden_iteration["lr_used"])
        recorder.clear()
        torch.manual_seed(golden_iteration["seed"])
        result = pretrain_iteration(parts, [batch(golden_iteration)], iteration + k, log_due=True)

        compare_logged(report, logged_values(parts.accelerator, result), golden_iteration["logged"])
        compare_forward(report, result, golden_iteration["forward"])
        report.check(
            "grad_norm_before_clip",
            "model_opt",
            relative(
                float(result.logs["optim/grad_norm"]), golden_iteration["grad_norm_before_clip"]["model_opt"]
            ),
        )
        quantile_grad = recorder.grads["quantile_opt"]["hyper_bottleneck.quantiles"]
        report.check(
            "grad_norm_before_clip",
            "quantiles",
            relative(quantile_grad.norm().item(), golden_iteration["quantile_grad_norm"]),
        )
        compare_grads(report, recorder, golden_iteration["grads"])
        updates = with_robustness(golden_iteration["updates"], record["params_after"])
        for name, digest in updates.items():
            if name not in recorder.before:
                pytest.fail(f"parameter {name} was not stepped in iteration {k}")
            compare_update(report, name, recorder.before[name], params[name], digest, after_each[k][name])

    assert scheduler.last_epoch == iteration + len(iterations)
    final = reports.final()
    for name, digest in record["params_after"].items():
        compare_params_after(final, name, params[name], digest, len(iterations))
    if "optimizer_state" in record:
        compare_optimizer_state(final, optimizers, record["optimizer_state"], names)
    assert model.training and not distortion.lpips.net.training
    reports.assert_ok()


# --- stage 2 ----------------------------------------------------------------------------------------------


def finetune_config_path(golden: dict) -> Path:
    """The released stage-2 config that fine-tunes the file's stage-1 rate (the stage-2 rate term
    itself may be `notarget`)."""
    return (
        REPO
        / "configs"
        / f"finetune_{golden['stage1']['config']['official_config']['rate_target']['target_bpp']}bpp.toml"
    )


def stage2_parts(golden: dict, released: FinetuneConfig):
    """The official stage-2 module as our parts: the released config with the golden run's rate
    target, batch and freezing, name-seeded weights."""
    config = golden["stage2"]["config"]
    frozen = golden["stage2_variant"] == "frozen"
    per_process_batch = golden["stage2"]["iterations"][0]["images_u8"].shape[0]
    cfg = load_config(
        FinetuneConfig,
        finetune_config_path(golden),
        rate_overrides(config["rate_target"], config["optimizer_steps_per_iteration"])
        + [
            f"data.batch_size={per_process_batch}",
            f"freeze.encoder={str(frozen).lower()}",
            f"freeze.bottleneck={str(frozen).lower()}",
        ],
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
    return cfg, parts, model, discriminator, labeller


@pytest.mark.slow  # full-size models: about 45 s per iteration
def test_stage2_iterations_match_official(golden):
    record, config = golden["stage2"], golden["stage2"]["config"]
    official = config["official_config"]
    iteration, per_iteration = config["iteration"], config["optimizer_steps_per_iteration"]
    assert config["global_step"] == per_iteration * iteration
    assert config.get("variant", "frozen") == golden["stage2_variant"]
    reports = Reports(golden)

    # The released config is recipe (a) as the official README's command really runs.
    released = load_config(FinetuneConfig, finetune_config_path(golden), [])
    check_released_rate(released, config["rate_target_finetune_command"], per_iteration)
    assert released.train.max_steps == official["trainer.max_steps"]
    assert released.data.global_batch_size == official["ngpu"] * official["data.batch_size"]
    assert (
        released.data.batch_size == official["data.batch_size"]
        and released.gan.mc_sampling == config["mc_sampling"]
    )
    assert released.gan.generator_weight == config["generator_weight"]
    assert (released.freeze.encoder, released.freeze.bottleneck) == (False, False)

    cfg, parts, model, discriminator, labeller = stage2_parts(golden, released)
    optimizers = {"model_opt": parts.optimizer, "discriminator_opt": parts.disc_optimizer}
    if parts.aux_optimizer is not None:
        optimizers["quantile_opt"] = parts.aux_optimizer
    assert list(optimizers) == config["optimizer_order"]  # frozen quantiles have no optimizer, as officially
    for label, optimizer in optimizers.items():
        check_optimizer(label, optimizer, config["optimizers"][label])

    iterations = record["iterations"]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n in record["unchanged"]}
    names = {id(p): n for n, p in model.named_parameters()}
    names.update({id(p): n for n, p in discriminator.named_parameters()})
    params = {**dict(model.named_parameters()), **dict(discriminator.named_parameters())}
    recorder = GradientRecorder(optimizers, names)
    after_each = {
        group: params_after_each_iteration(iterations, digests, group)
        for group, digests in record["params_after"].items()
    }
    grad_norms = {"model_opt": "optim/grad_norm", "discriminator_opt": "optim/disc_grad_norm"}
    logits = {
        "generator_step": "generator_logits",
        "discriminator_fake": "fake_logits",
        "discriminator_real": "real_logits",
    }
    for k, golden_iteration in enumerate(iterations):  # back to back, on the same parts
        report = reports.iteration(k)
        assert golden_iteration["iteration"] == iteration + k
        assert golden_iteration["global_step"] == per_iteration * (iteration + k)
        check_lrs(report, optimizers, golden_iteration["lr_used"])
        recorder.clear()
        torch.manual_seed(golden_iteration["seed"])
        result = finetune_iteration(parts, [batch(golden_iteration)], iteration + k, log_due=True)

        # Labels and discriminator calls.
        tensors = result.discriminator
        for ours, key in ((tensors.generator_targets, "model"), (tensors.real_targets, "disc")):
            mismatch = int(((ours - 1) != golden_iteration["labels"][key]).sum())
            report.check("labels_mismatch", f"labels {key}", mismatch)
        for call in golden_iteration["discriminator_calls"]:
            ours = getattr(tensors, logits[call["role"]])
            compare_tensor(report, "forward", f"logits {call['role']}", ours, call["logits"])

        logged = logged_values(parts.accelerator, result)
        compare_logged(report, logged, golden_iteration["logged"])
        # The fine-tune command's own rate configuration: the same forward, another rate weighting.
        rate = result.rate
        target, lam_above = rate_schedule(released.rate, iteration + k)
        command_rate = targeted_rate(rate.bpp, rate.rounded_bpp, target, released.rate.lam_below, lam_above)
        command_total = (
            cfg.distortion.lam * logged["train/distortion_loss"]
            + float(command_rate)
            + cfg.gan.generator_weight * logged["train/generator_loss"]
        )
        compare_logged(
            report,
            {
                "train/rate_loss": command_rate,
                "train/total_model_loss": command_total,
                "train/target": target,
                "train/lam2": lam_above,
            },
            golden_iteration["logged_finetune_command"],
        )
        compare_forward(report, result, golden_iteration["forward"])

        for label, value in golden_iteration["grad_norm_before_clip"].items():
            report.check(
                "grad_norm_before_clip", label, relative(float(result.logs[grad_norms[label]]), value)
            )
        compare_grads(report, recorder, golden_iteration["grads"])
        for group, digests in golden_iteration["updates"].items():
            for name, digest in with_robustness(digests, record["params_after"][group]).items():
                if name not in recorder.before:
                    pytest.fail(f"parameter {name} was not stepped in iteration {k}")
                compare_update(
                    report, name, recorder.before[name], params[name], digest, after_each[group][k][name]
                )
        for name in frozen:
            assert params[name].grad is None, f"frozen {name} got a gradient in iteration {k}"

    final = reports.final()
    for digests in record["params_after"].values():
        for name, digest in digests.items():
            compare_params_after(final, name, params[name], digest, len(iterations))
    if "optimizer_state" in record:
        compare_optimizer_state(final, optimizers, record["optimizer_state"], names)

    # Frozen parts: bit-identical, no gradient, eval mode.
    for name, digest in record["unchanged"].items():
        value = params[name].detach()
        assert params[name].grad is None, f"frozen {name} got a gradient"
        assert torch.equal(value, frozen[name]), f"frozen {name} changed"
        assert torch.equal(value.double().reshape(-1)[digest["idx"]], digest["val"]), (
            f"frozen {name} differs from the official fill"
        )
        tolerance = golden["tolerances_final"]["unchanged"]
        assert abs(value.double().sum().item() - digest["sum"]) <= tolerance * max(1.0, abs(digest["sum"]))
    modes = {
        "encoder": model.encoder,
        "hyper_analysis": model.hyper_analysis,
        "hyper_bottleneck": model.hyper_bottleneck,
        "latent_bottleneck": model.latent_bottleneck,
        "decoder": model.decoder,
        "discriminator": discriminator,
        "latent_projector": labeller,
        "lpips": parts.distortion.lpips.net,
    }
    for name, module in modes.items():
        assert module.training == config["module_modes"][f"{name}.training"], f"{name}.training"
    reports.assert_ok()


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
