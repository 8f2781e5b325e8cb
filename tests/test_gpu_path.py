"""The GPU path on this CPU: a trace split over devices, stage 1's memory, quantized loading, the decode loop.

A model split over devices (``device_map``) keeps each layer's trace on that layer's device. There is no
second real device here, so the split trace puts its layers on ``cpu`` and ``meta`` and a torch-function mode
checks that every tensor an op receives lies on one device: a misplaced index fails the test even though
``meta`` would accept it silently.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch.overrides import TorchFunctionMode

from diffmas_eval.latent import chain as chain_module
from diffmas_eval.latent.chain import AgentChain
from diffmas_eval.latent.config import LatentConfig
from diffmas_eval.latent.trace import LatentTrace, Segment
from diffmas_eval.tiny import make_tiny_model

QUESTIONS = ["What is 2 + 3?", "Name a prime number greater than ten, please.", "Why?"]


class OneDevicePerOp(TorchFunctionMode):
    """Records every torch op whose tensor arguments (0-dim ones aside) span more than one device."""

    def __init__(self) -> None:
        super().__init__()
        self.mixed: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = set()

        def visit(x):
            if isinstance(x, torch.Tensor) and x.dim() > 0:
                devices.add(x.device)
            elif isinstance(x, (list, tuple)):
                for y in x:
                    visit(y)

        visit(args)
        visit(list(kwargs.values()))
        if len(devices) > 1:
            self.mixed.append(f"{getattr(func, '__name__', func)}: {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def split_trace(batch: int = 3, layers: int = 4, width: int = 5) -> LatentTrace:
    """A trace whose first half of layers lives on ``cpu``, the second on ``meta``, rows right-padded."""
    trace = LatentTrace(batch, layers, "cpu")
    for i in range(layers):
        device = "cpu" if i < layers // 2 else "meta"
        trace.keys[i] = torch.randn(batch, 2, width, 4).to(device)
        trace.values[i] = torch.randn(batch, 2, width, 4).to(device)
    real = torch.tensor([width, width - 2, width - 1][:batch])
    trace.mask = (torch.arange(width)[None, :] < real[:, None]).long()  # right-padded: left_align has work
    trace.next_pos = real.clone()
    trace.add_segment(Segment("planner", width, 0, real.tolist()))
    return trace


def test_split_trace_ops_index_on_each_layers_device():
    trace = split_trace()
    with OneDevicePerOp() as mode:
        trace.left_align()
        picked = trace.select([0, 0, 2, 1])
        picked.select(torch.tensor([1, 3]))
        trace.fork()
        trace.keep_last_segment()
    assert not mode.mixed, mode.mixed
    assert [k.device.type for k in picked.keys] == ["cpu", "cpu", "meta", "meta"]
    assert picked.batch == 4 and picked.keys[0].shape[0] == 4 and picked.keys[3].shape[0] == 4


def test_split_trace_select_matches_one_device_trace():
    """The cpu half of a split trace selects the same rows as the unsplit trace does."""
    trace = split_trace()
    cpu = LatentTrace(trace.batch, 4, "cpu")
    cpu.keys = [k if k.device.type == "cpu" else torch.zeros(k.shape) for k in trace.keys]
    cpu.values = [v if v.device.type == "cpu" else torch.zeros(v.shape) for v in trace.values]
    cpu.mask, cpu.next_pos = trace.mask, trace.next_pos
    a, b = trace.select([2, 0]), cpu.select([2, 0])
    for i in range(2):
        assert torch.equal(a.keys[i], b.keys[i]) and torch.equal(a.values[i], b.values[i])
    assert torch.equal(a.mask, b.mask)


def test_one_device_per_op_catches_a_misplaced_index():
    """The detector itself: indexing a meta layer with a cpu index is reported."""
    t = torch.empty(2, 1, 3, 1, device="meta")
    with OneDevicePerOp() as mode:
        t.index_select(0, torch.tensor([1, 0]))
    assert mode.mixed


# -- stage 1 keeps only the last layer's hidden state ----------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
@torch.no_grad()
def test_stage1_last_hidden_state_is_bit_identical_to_hidden_states_last(arch, monkeypatch):
    """The hook on the decoder reads exactly ``hidden_states[-1]`` (after the final norm), batch and padding
    included; the fallback (no decoder found) is today's path."""
    model, tok = make_tiny_model(arch)
    config = LatentConfig(latent_steps=3)
    new = AgentChain(model, tok, config).stage1(QUESTIONS, record_inputs=True)
    monkeypatch.setattr(chain_module, "decoder_of", lambda model: None)
    old = AgentChain(model, tok, config).stage1(QUESTIONS, record_inputs=True)
    assert all(torch.equal(a, b) for a, b in zip(new.keys + new.values, old.keys + old.values))
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(new.history, old.history))


def test_stage1_asks_for_no_hidden_states_and_finds_the_decoder_under_wrappers():
    model, tok = make_tiny_model("qwen3")
    seen = []
    original = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("output_hidden_states"))
        return original(*args, **kwargs)

    model.forward = spy
    with torch.no_grad():
        AgentChain(model, tok, LatentConfig(latent_steps=2)).stage1(QUESTIONS[:2])
    assert seen and not any(seen)
    assert chain_module.decoder_of(model) is model.model
    from diffmas_eval.training.trainer import _CallThrough
    assert chain_module.decoder_of(_CallThrough(model, model)) is model.model


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@torch.no_grad()
def test_latent_dtype_float32_casts_module_by_module_as_the_whole_model_cast_did(arch, monkeypatch):
    """Per-module casting gives the numbers of casting the whole model to float32 first, and holds at most one
    module's float32 copy at a time."""
    model, tok = make_tiny_model(arch)
    model = model.to(torch.bfloat16)
    config = LatentConfig(latent_steps=3, latent_dtype="float32")
    up = AgentChain(model, tok, config).stage1(QUESTIONS, record_inputs=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}

    @contextmanager
    def whole_model(m):  # the cast this replaced: every half tensor in float32 for all of stage 1
        tensors = [t for t in (*m.parameters(), *m.buffers()) if t.dtype == torch.bfloat16]
        for t in tensors:
            t.data = t.data.float()
        yield
        for t in tensors:
            t.data = t.data.to(torch.bfloat16)

    monkeypatch.setattr(chain_module, "_upcast", whole_model)
    ref = AgentChain(model, tok, config).stage1(QUESTIONS, record_inputs=True)
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(ref.keys + ref.values, up.keys + up.values))
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(ref.history, up.history))

    largest = max(sum(t.numel() for t in m.parameters(recurse=False)) for m in model.modules()) * 4
    live = []
    with chain_module._upcast(model):
        def watch(module, args, output):
            live.append(sum(p.numel() * 4 for p in model.parameters() if p.dtype == torch.float32))
        handles = [m.register_forward_hook(watch) for m in model.modules()]
        AgentChain(model, tok, LatentConfig(latent_steps=1)).stage1(QUESTIONS[:1])
        for h in handles:
            h.remove()
    assert live and max(live) <= largest
