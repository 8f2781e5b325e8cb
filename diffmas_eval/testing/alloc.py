"""The peak of the bytes torch allocates during a call, on any device, the CPU included.

Resident memory cannot see a reservation that is never written (``torch.empty`` of a 150 GB KV cache costs no
page until it is touched), and CUDA's ``max_memory_allocated`` has no CPU counterpart. The profiler's memory
events can: with ``profile_memory=True`` every allocation and free of torch's allocator is recorded with its size,
so replaying them in order gives the largest amount held at once, counted from the call's start (tensors that
existed before are not counted, and their frees are not seen).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch.profiler import ProfilerActivity, profile

T = TypeVar("T")


def peak_allocated(fn: Callable[[], T], device: str = "cpu") -> tuple[int, T]:
    """``(peak, fn())``: the most bytes ``fn`` held at once on ``device``'s type (``cpu`` or ``cuda``) beyond what
    was allocated before it ran."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities, profile_memory=True) as prof:
        out = fn()
    kind = torch.device(device).type
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and _device_type(e) == kind]
    held = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        held += e.nbytes()
        peak = max(peak, held)
    return peak, out


def _device_type(event) -> str:
    """The device type of a profiler memory event, as ``torch.device`` names it."""
    return str(event.device_type()).rsplit(".", 1)[-1].lower()
