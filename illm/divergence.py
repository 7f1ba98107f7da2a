"""The guard against a diverging run: checked at every log and before every checkpoint write,
never per iteration (one small cross-process reduction then)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from illm.errors import IllmError
from illm.files import atomic_write_bytes

DIVERGED_RECORD = "diverged.json"


class Diverged(IllmError):
    """A non-finite loss, gradient norm or parameter: the run stops on every process."""


def guarded_names(logs: dict, scaler_active: bool) -> list[str]:
    """The logged losses and gradient norms. Under an fp16 GradScaler an infinite gradient norm
    is normal: the scaler skips that step and lowers its scale."""
    names = [name for name in logs if name.endswith("loss")]
    if not scaler_active:
        names += [name for name in logs if name.endswith("grad_norm")]
    return names


def nonfinite_parameters(models: dict) -> Tensor:
    """One flag per model: whether any of its parameters holds a NaN or an infinity."""
    flags = []
    for model in models.values():
        params = [p.detach() for p in model.parameters()]
        flags.append(
            torch.stack([~torch.isfinite(p).all() for p in params]).any() if params else torch.tensor(False)
        )
    return torch.stack(flags)


def check_finite(run, step: int, logs: dict, models: dict) -> None:
    """Raise `Diverged` on every process when any process has a non-finite guarded value or
    parameter, naming the iteration, the quantity and the last intact checkpoint."""
    accelerator = run.accelerator
    names = guarded_names(logs, accelerator.scaler is not None)
    values = [torch.as_tensor(logs[name]).detach().float().reshape(()) for name in names]
    device = accelerator.device
    flags = torch.cat(
        [
            torch.stack([~torch.isfinite(v.to(device)) for v in values])
            if values
            else torch.zeros(0, dtype=torch.bool, device=device),
            nonfinite_parameters(models).to(device),
        ]
    ).float()
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    bad = flags.cpu().nonzero().flatten().tolist()  # the one host sync of the check
    if not bad:
        return
    quantities = names + [f"a parameter of the {name}" for name in models]
    last = run.checkpoints.latest_intact()
    lr = run.config.optim.lr
    how = (
        f"the last intact checkpoint is {last}; continue from it with a lower learning rate: "
        f"run.resume_from={last} optim.lr=<below {lr:g}>"
        if last
        else f"no checkpoint was written yet; start over with an optim.lr below {lr:g}"
    )
    message = f"diverged at iteration {step}: {quantities[bad[0]]} is not finite; {how}"
    if accelerator.is_main_process:
        record = {"step": step, "lr": lr, "message": message}
        try:
            atomic_write_bytes(run.checkpoints.run_dir / DIVERGED_RECORD, json.dumps(record).encode())
        except OSError:
            pass  # the record only spares restarts; the run stops either way
    raise Diverged(message)


def refuse_repeated_divergence(run_dir: Path, config, resume_from) -> None:
    """Fail at once when the run diverged before and nothing that could change that was changed:
    an automatic restart (`accelerate launch --max_restarts`) then does not train into the same
    divergence again. A new `optim.lr` clears the record."""
    path = Path(run_dir) / DIVERGED_RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if record.get("lr") != config.optim.lr:
        path.unlink(missing_ok=True)
        return
    raise Diverged(f"{record.get('message', 'the run diverged')} (recorded in {path})")
