"""The GPU path on this CPU: a trace split over devices, stage 1's memory, quantized loading, the decode loop.

A model split over devices (``device_map``) keeps each layer's trace on that layer's device. There is no
second real device here, so the split trace puts its layers on ``cpu`` and ``meta`` and a torch-function mode
checks that every tensor an op receives lies on one device: a misplaced index fails the test even though
``meta`` would accept it silently.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from diffmas_eval.latent.trace import LatentTrace, Segment


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
