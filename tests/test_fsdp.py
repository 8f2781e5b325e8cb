"""FSDP2 (torch's ``fully_shard``, per decoder layer, reshard after forward) on 2 CPU processes: the
first step's loss and every LoRA gradient equal one process at the same global batch, and the saved
adapter scores in lm-eval as the one-process adapter does.

accelerate cannot stand in here: it runs FSDP only on GPUs, and ``ACCELERATE_USE_CPU=1 accelerate launch
--config_file trainers/configs/fsdp.yaml`` silently trains with DDP. So ``fsdp_probe.py`` shards the
package's own trainer's model through torch directly, as ``fsdp.yaml`` asks accelerate to on GPUs
(details in its docstring). Without the chain's backward unshard hook on the cache tensors
(``latent.distributed.unshard_in_backward``) the sharded run fails in backward ("setStorage: ... storage of
size 0": a layer's backward through the trace ran on resharded, freed weights).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PROBE = Path(__file__).with_name("fsdp_probe.py")
ROOT = Path(__file__).resolve().parents[1]


def _launch(launcher: list[str], tiny_path: Path, out: Path, extra: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([*launcher, str(PROBE), str(tiny_path), str(out), *extra], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)


def _run(launcher: list[str], tiny_path: Path, out: Path, extra: list[str]) -> tuple[dict, dict]:
    proc = _launch(launcher, tiny_path, out, extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "step.json").read_text()), torch.load(out / "grads.pt")


def _torchrun() -> list[str]:
    return [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port())]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("extra", [[], ["--checkpoint"]], ids=["plain", "checkpoint_agents"])
def test_fsdp2_first_step_equals_one_process_and_the_adapter_loads(tiny_path, tmp_path, extra):
    one, grads_one = _run([sys.executable], tiny_path, tmp_path / "one", extra)
    two, grads_two = _run(_torchrun(), tiny_path, tmp_path / "two", extra)
    assert (one["world_size"], two["world_size"]) == (1, 2) and one["n_items"] == two["n_items"]
    # stage 1 read only the last hidden state, sharded too (a forward per prompt, latent step and final agent)
    assert one["forwards"] == two["forwards"] > 1 and not one["asked_hidden_states"] and not two["asked_hidden_states"]
    # float32; measured: the losses are equal to the last bit, gradients within 5e-7 of their largest entry
    assert abs(one["loss"] - two["loss"]) < 1e-5 * max(1.0, abs(one["loss"]))
    assert grads_one.keys() == grads_two.keys() and len(grads_one) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(g.abs().sum() > 0 for g in grads_one.values())
    for name, g in grads_one.items():
        torch.testing.assert_close(grads_two[name], g, rtol=1e-4, atol=1e-6, msg=name)

    # the adapter saved from the gathered shards (after one SGD step) loads in lm-eval's diffmas model
    from lm_eval.api.instance import Instance

    from diffmas_eval.harness.diffmas_lm import DiffMASLM

    request = [Instance("loglikelihood", {}, ("Question: What is 12 + 30?\nAnswer:", " 42"), 0)]
    scores = []
    for run in ("one", "two"):
        adapter = tmp_path / run / "adapter"
        assert json.loads((adapter / "diffmas.json").read_text())["latent_steps"] == 2
        lm = DiffMASLM(pretrained=str(tiny_path), peft=str(adapter), device="cpu", batch_size=1)
        assert lm.chain.config.latent_steps == 2 and len(lm.chain.config.roles) == 3  # the saved chain
        scores.append(lm.loglikelihood(request, disable_tqdm=True)[0][0])
    base = DiffMASLM(pretrained=str(tiny_path), device="cpu", batch_size=1, agents=3, latent_steps=2)
    assert abs(scores[0] - scores[1]) < 1e-4  # same trained adapter (float32)
    assert abs(scores[0] - base.loglikelihood(request, disable_tqdm=True)[0][0]) > 1e-3  # and it was trained


def test_fsdp2_backward_through_the_trace_needs_the_unshard_hook(tiny_path, tmp_path):
    """Without the hook on the cache tensors, the sharded backward runs an earlier agent's layer on
    resharded (freed) weights: the failure the hook exists for, so it cannot silently become dead code."""
    proc = _launch(_torchrun(), tiny_path, tmp_path / "nohook", ["--no-unshard-hook"])
    assert proc.returncode != 0 and "storage of size 0" in proc.stderr


def test_fsdp2_backward_needs_stage1s_hidden_state_passed_out_of_the_model(tiny_path, tmp_path):
    """Stage 1 reads the last hidden state by a hook on the decoder and passes it out as the model's
    ``hidden_states``; read only as an inner tensor it carries none of FSDP2's pre-backward hooks, and a later
    latent step's backward reshards the root unit before this state's backward reaches the final norm: the
    process dies on freed weights (SIGSEGV on this CPU). Keeps the pass-on from silently becoming dead code."""
    proc = _launch(_torchrun(), tiny_path, tmp_path / "inner", ["--inner-hidden-state"])
    died = "SIGSEGV" in proc.stderr or "storage of size 0" in proc.stderr
    assert proc.returncode != 0 and died, proc.stderr[-2000:]
