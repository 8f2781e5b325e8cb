"""``accelerate launch --num_processes 2 trainers/sft.py`` (DDP on gloo): the first step equals one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent
PROBE = Path(__file__).with_name("sft_probe.py")
ROWS = [  # different lengths: the loss is normalised by the target tokens of the global batch
    {"prompt": "Question: What is 12 + 30?\nAnswer:", "completion": " 42"},
    {"prompt": "Question: Which animal barks? (A) fox (B) dog\nAnswer:", "completion": " (B) dog, the one that barks"},
    {"prompt": "Question: What is 2 + 3?\nAnswer:", "completion": " 5"},
    {"prompt": "The quick brown fox jumps over the lazy what?", "completion": " dog"},
]


def _train(launcher: list[str], per_device: int, tiny_path: Path, data: Path, out: Path,
           extra: list[str]) -> tuple[dict, dict]:
    out.mkdir()
    args = ["--model_name_or_path", str(tiny_path), "--dataset_name", str(data), "--use_peft", "--lora_r", "4",
            "--lora_target_modules", "q_proj", "v_proj", "--lora_dropout", "0",
            "--agents", "3", "--latent_steps", "1",
            "--per_device_train_batch_size", str(per_device), "--max_steps", "2", "--learning_rate", "1e-3",
            "--train_sampling_strategy", "sequential", "--max_grad_norm", "0", "--logging_steps", "1",
            "--report_to", "none", "--save_strategy", "no", "--seed", "0", "--dtype", "float32",
            "--output_dir", str(out / "model"), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run([*launcher, str(PROBE), str(out), *args], capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "first_step.json").read_text()), torch.load(out / "grads.pt")


# --gradient_checkpointing: the trainer turns it into per-agent non-reentrant checkpointing, which DDP accepts
# with the many forwards of one step (reentrant checkpointing fails there with "marked ready twice")
@pytest.mark.parametrize("extra", [[], ["--gradient_checkpointing", "true"]], ids=["plain", "checkpointing"])
def test_ddp_first_step_equals_one_process(tiny_path, tmp_path, extra):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    one, grads_one = _train([sys.executable], 4, tiny_path, data, tmp_path / "one", extra)
    # accelerate 1.x on CPU: its torchrun launcher (--multi_gpu) with ACCELERATE_USE_CPU=1 gives 2 gloo processes
    two, grads_two = _train([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
                            2, tiny_path, data, tmp_path / "two", extra)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert abs(one["loss"] - two["loss"]) < 1e-5 * max(1.0, abs(one["loss"]))
    assert grads_one.keys() == grads_two.keys() and len(grads_one) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert any(g.abs().sum() > 0 for g in grads_one.values())
    for name, g in grads_one.items():
        torch.testing.assert_close(grads_two[name], g, rtol=1e-4, atol=1e-6, msg=name)
