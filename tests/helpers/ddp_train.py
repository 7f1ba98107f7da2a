"""Run a stage under `accelerate launch`, then save this process's parameters as rank<N>.pt.

usage: ddp_train.py STAGE OUT_DIR CONFIG [overrides...]   (STAGE: pretrain | vqvae | finetune)
"""

import importlib
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from illm.config import load_config

CONFIGS = {"pretrain": "PretrainConfig", "vqvae": "VQVAEConfig", "finetune": "FinetuneConfig"}

if __name__ == "__main__":
    stage, out_dir, config_path, *overrides = sys.argv[1:]
    experiment = importlib.import_module("illm.experiment")
    cfg = load_config(getattr(experiment, CONFIGS[stage]), config_path, overrides)
    model = importlib.import_module(f"illm.stages.{stage}").train(cfg)
    state = PartialState()
    params = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(
        {"rank": state.process_index, "world": state.num_processes, "params": params},
        Path(out_dir) / f"rank{state.process_index}.pt",
    )
