"""Run trainers/sft.py as is, and save (rank 0) the first step's loss and LoRA gradients: ``sft_probe.py OUT ARGS``.

The gradients are read just before the first optimizer step, after DDP has averaged them across processes.
"""

import json
import runpy
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from diffmas_eval.training import trainer as diffmas_trainer

OUT = Path(sys.argv[1])


class FirstStep(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0 and state.is_world_process_zero:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
            torch.save(grads, OUT / "grads.pt")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step == 1 and state.is_world_process_zero and "loss" in (logs or {}):
            (OUT / "first_step.json").write_text(json.dumps({**logs, "world_size": args.world_size}))


_init = diffmas_trainer.DiffMASSFTTrainer.__init__


def _init_with_probe(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.add_callback(FirstStep())


diffmas_trainer.DiffMASSFTTrainer.__init__ = _init_with_probe
sys.argv = [str(Path(__file__).resolve().parents[1] / "trainers" / "sft.py"), *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
