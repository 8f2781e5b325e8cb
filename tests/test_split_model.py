"""A model split over two devices, the way ``device_map="auto"`` splits an untied model over two GPUs.

There is no second device on this CPU, so the second "GPU" is ``diffmas_eval.testing.virtual_device``: tensors
there report ``meta`` as their device and compute on CPU data. The model's first half (embedding, RoPE, layer 0)
stays on ``cpu``, the second (layer 1, final norm, untied ``lm_head``) goes to ``meta``, and accelerate's own
hooks (``attach_align_device_hook_on_blocks``, what ``dispatch_model`` attaches) move each block's inputs to its
device, with the whole model's hook on the main device, as ``dispatch_model`` sets it.

What it sees: every torch call whose tensor arguments lie on both devices (``OneDevicePerOp``, a torch-function
mode), and every dispatched op of forward *and backward* that mixes them (the virtual device's own record);
whether the chain finds each layer's device (``check_devices`` refuses a trace on the wrong one); and that the
split changes no number. What it cannot see: CUDA itself (streams, peer copies, allocator, kernels); it is
stricter than CUDA where CUDA allows a mix (a cross-device ``copy_``); 0-dim CPU tensors pass, as on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from accelerate.hooks import attach_align_device_hook_on_blocks

from diffmas_eval.latent.chain import AgentChain
from diffmas_eval.latent.config import LatentConfig
from diffmas_eval.latent.distributed import layer_devices
from diffmas_eval.latent.realign import Realigner
from diffmas_eval.testing.tiny import make_tiny_model
from diffmas_eval.testing.virtual_device import VirtualDevice, place

from .test_gpu_path import OneDevicePerOp

QUESTIONS = ["What is 2 + 3?", "Name a prime number greater than ten, please.", "Why?"]
SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
         "model.layers.1": "meta", "model.norm": "meta", "lm_head": "meta"}


def split(model: torch.nn.Module) -> None:
    """Place ``model``'s blocks per ``SPLIT`` and hook them as ``dispatch_model`` does (inside ``VirtualDevice``)."""
    for name, device in SPLIT.items():
        place(model.get_submodule(name), device)
    execution = {**{k: torch.device(v) for k, v in SPLIT.items()}, "": torch.device("cpu")}
    attach_align_device_hook_on_blocks(model, execution_device=execution, offload={k: False for k in SPLIT})


def run_chain(model, tok) -> dict:
    """Construction, stage 1, scoring, generation and one training step (loss, backward, SGD step)."""
    out = {}
    chain = AgentChain(model, tok, LatentConfig(latent_steps=2), trainable_realign=True)
    out["w_a"] = chain.realigner.weight.detach().cpu()
    out["w_a_device"] = chain.realigner.weight.device
    with torch.no_grad():
        trace = chain.stage1(QUESTIONS)
        out["trace_devices"] = [k.device.type for k in trace.keys]
        out["keys"] = [k.cpu() for k in trace.keys]
        out["scores"] = chain.loglikelihood(trace.select([0, 1]), [[5, 6, 7], [8, 9]], [[3], [4, 5]])
        out["tokens"] = [g.token_ids for g in chain.generate(trace, [chain.final_prompt(q) for q in QUESTIONS],
                                                             max_new_tokens=6, ignore_eos=True)]
    loss = chain.loss(chain.stage1(QUESTIONS[:2]), [[5, 6, 7, 8]] * 2, [[-100, 6, 7, 8]] * 2)
    loss.backward()
    out["loss"] = loss.detach().cpu()
    params = {"embed": model.model.embed_tokens.weight, "layer1": model.model.layers[1].mlp.up_proj.weight,
              "lm_head": model.lm_head.weight, "realign": chain.realigner.weight}
    out["grads"] = {k: p.grad.cpu() for k, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.sub_(0.1 * p.grad)
        out["after_step"] = chain.loglikelihood(chain.stage1(QUESTIONS[:1]), [[5, 6, 7]], [[3]])
    return out


def test_a_split_chain_runs_with_no_op_mixing_devices_and_the_numbers_of_one_device():
    model, tok = make_tiny_model("qwen3")  # untied: lm_head and the embedding are different tensors
    assert not model.config.tie_word_embeddings
    ref = run_chain(*make_tiny_model("qwen3"))
    with VirtualDevice() as virtual:
        split(model)
        assert layer_devices(model) == {0: torch.device("cpu"), 1: torch.device("meta")}
        with OneDevicePerOp() as detector:
            got = run_chain(model, tok)
    assert not detector.mixed, detector.mixed[:5]
    assert not virtual.mixed, virtual.mixed[:5]
    assert got["trace_devices"] == ["cpu", "meta"]  # each layer's trace where that layer runs
    assert got["w_a_device"].type == "cpu"  # W_a where latent vectors are consumed: the embedding's device
    assert torch.equal(got["w_a"], ref["w_a"])
    for a, b in zip(got["keys"], ref["keys"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for (s, g), (rs, rg) in zip(got["scores"] + got["after_step"], ref["scores"] + ref["after_step"]):
        assert s == pytest.approx(rs, abs=1e-5) and g == rg
    assert got["tokens"] == ref["tokens"]
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=0, atol=1e-6)
    for name, grad in got["grads"].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, ref["grads"][name], rtol=1e-5, atol=1e-6)


def test_the_detectors_see_the_one_shot_ridge_product_mix_devices():
    """The realignment before vocabulary chunks (``w_out.T @ w_in`` where the weights lie) on the split model:
    both detectors report it, so the test above would fail on that code."""
    model, tok = make_tiny_model("qwen3")
    with VirtualDevice() as virtual:
        split(model)
        with OneDevicePerOp() as detector:
            w_in = model.get_input_embeddings().weight.detach().float()
            w_out = model.get_output_embeddings().weight.detach().float()
            w_out.T @ w_in
    assert any(m.startswith("matmul") for m in detector.mixed) and virtual.mixed


def _one_shot(w_out: torch.Tensor, w_in: torch.Tensor, lam: float, dtype: torch.dtype) -> torch.Tensor:
    """The ridge solution as computed before: two ``V x hidden`` copies, one product each."""
    w_out, w_in = w_out.to(dtype), w_in.to(dtype)
    return torch.linalg.solve(w_out.T @ w_out + lam * torch.eye(w_in.shape[1], dtype=dtype), w_out.T @ w_in)


@pytest.mark.parametrize("chunk", [7, 50, 128])
def test_the_chunked_gram_gives_the_one_shot_ridge_solution_within_its_own_rounding(chunk):
    """Summing the Gram matrix in vocabulary chunks changes float32 rounding only. The floor: the one-shot float32
    solution's own distance from the float64 one (2.1e-7 here, entries up to 0.22); measured, the chunked one is
    0.7e-7..1.3e-7 from float64 and 2.0e-7..2.2e-7 from the one-shot float32 (on a 20000 x 256 random matrix:
    1.7e-8 floor, 1.7e-8..2.0e-8 and 1.5e-8..1.7e-8). Bound: within 2x the floor of float64, 3x of the old."""
    from diffmas_eval.latent.realign import ridge_terms

    model, _ = make_tiny_model("llama")
    w_out, w_in = model.lm_head.weight.detach(), model.model.embed_tokens.weight.detach()
    assert w_in.shape[0] > chunk
    exact = _one_shot(w_out, w_in, 1e-5, torch.float64)
    old = _one_shot(w_out, w_in, 1e-5, torch.float32)
    gram, cross, norm = ridge_terms(w_out, w_in, 1.0, torch.float32, w_in.device, chunk)
    new = torch.linalg.solve(gram + 1e-5 * torch.eye(w_in.shape[1]), cross)
    floor = float((old.double() - exact).abs().max())
    assert 0 < floor < 1e-6
    assert float((new.double() - exact).abs().max()) <= 2 * floor
    assert float((new - old).abs().max()) <= 3 * floor
    torch.testing.assert_close(norm, w_in.norm(dim=-1).mean(), rtol=1e-6, atol=0)
    # one chunk (every tiny vocabulary under CHUNK_ROWS): the old numbers bit for bit
    assert torch.equal(Realigner(model).weight, old)


def test_the_ridge_solve_holds_no_full_float32_copy_of_the_vocabulary():
    """Peak bytes torch allocates while building W_a for a 151,936 x 64 bfloat16 embedding and head (Qwen3's
    vocabulary): measured 297.8 MB for the one-shot formula at hidden 256 (two float32 V x H copies) and 48.5 MB
    chunked; here at hidden 64: 77.9 MB one-shot, 12.6 MB chunked, against a bound of one float32 V x H copy
    (38.9 MB). The two solutions differ by 6.7e-8 (5e-7 of the largest entry, the float32 rounding floor measured
    in the test above); bound 2e-6 of it."""
    from diffmas_eval.testing.live_bytes import LiveBytes

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(151_936, 64).to(torch.bfloat16)
            self.head = torch.nn.Linear(64, 151_936, bias=False).to(torch.bfloat16)

        def get_input_embeddings(self) -> torch.nn.Module:
            return self.embed

        def get_output_embeddings(self) -> torch.nn.Module:
            return self.head

    model = Head()
    copy = 151_936 * 64 * 4
    with LiveBytes() as new:
        w_a = Realigner(model).weight
    with LiveBytes() as old:
        reference = _one_shot(model.head.weight.detach(), model.embed.weight.detach(), 1e-5, torch.float32)
    assert old.peak >= 2 * copy and new.peak < copy, (old.peak, new.peak)
    assert float((w_a - reference).abs().max()) <= 2e-6 * float(reference.abs().max())
