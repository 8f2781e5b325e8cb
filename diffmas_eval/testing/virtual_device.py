"""A second device on a CPU-only machine, to test a model split over devices (``device_map``) without a GPU.

``meta`` cannot stand in for a second GPU by itself: it holds no data, so nothing computed there can be compared
or decoded. Here a tensor "on the second device" is a ``VirtualTensor``: a wrapper subclass that *reports*
``meta`` as its device (so every device check in torch, transformers, accelerate and this package sees two
devices) and holds its data in an ordinary CPU tensor that every op unwraps and computes on. Inside
``VirtualDevice()`` (a torch-function mode):

- moves (``tensor.to("meta")``, ``.to("cpu")``, ``.cpu()``) copy between the devices, differentiably (a custom
  autograd function each way, so backward moves gradients back as a GPU copy would);
- factories asked for ``device="meta"`` (``torch.empty(0, device=...)``, ``torch.arange``...) build on the CPU
  and wrap;
- an op that gets a ``VirtualTensor`` and a non-scalar plain CPU tensor together is recorded in ``mixed``
  (torch itself would compute it: the unwrapped data are both on the CPU). That check runs at the dispatcher,
  below autograd, so it also sees the ops of backward, which a torch-function mode (``OneDevicePerOp`` of
  ``tests/test_gpu_path.py``) never sees.

What it cannot see: anything particular to CUDA (streams, events, peer copies, allocator behaviour, kernels
that exist for one device type only); a cross-device ``copy_`` CUDA allows is reported as mixing, as is a CPU
index into a GPU tensor, so it is stricter than CUDA there; 0-dim CPU tensors are allowed with either device,
as CUDA allows them. Only the two devices ``cpu`` and ``meta`` exist: a real ``meta`` tensor made outside the
mode is not a ``VirtualTensor`` and will not compute.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import return_and_correct_aliasing
from torch.utils._pytree import tree_flatten, tree_map

VIRTUAL = torch.device("meta")
_RECORDERS: list[list[str]] = []  # the ``mixed`` lists of the active ``VirtualDevice`` modes


class VirtualTensor(torch.Tensor):
    """A tensor reported on ``VIRTUAL`` whose data ``elem`` is an ordinary CPU tensor."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor, requires_grad: bool = False) -> VirtualTensor:
        out = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=VIRTUAL, requires_grad=requires_grad)
        out.elem = elem
        return out

    def __repr__(self) -> str:  # the default repr would read data on meta
        return f"VirtualTensor({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        plain = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, VirtualTensor) and t.dim() > 0]
        if plain:
            for recorder in _RECORDERS:
                recorder.append(f"{func} (dispatch): {VIRTUAL} with cpu {[tuple(t.shape) for t in plain]}")
        to_cpu = kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu"
        if "device" in kwargs and kwargs["device"] is not None:
            kwargs = {**kwargs, "device": torch.device("cpu")}
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if to_cpu:  # aten._to_copy(device=cpu): leaves the virtual device
            return out
        out = tree_map(lambda t: VirtualTensor(t) if isinstance(t, torch.Tensor) else t, out)
        return return_and_correct_aliasing(func, args, kwargs, out)


def _unwrap(x: Any) -> Any:
    return x.elem if isinstance(x, VirtualTensor) else x


class _ToVirtual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return VirtualTensor(x.detach().clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _to_cpu(grad)


class _ToCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.elem.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _to_virtual(grad)


def _to_virtual(x: torch.Tensor) -> torch.Tensor:
    return x if isinstance(x, VirtualTensor) else _ToVirtual.apply(x)


def _to_cpu(x: torch.Tensor) -> torch.Tensor:
    return _ToCpu.apply(x) if isinstance(x, VirtualTensor) else x


def _device_type(device: Any) -> str | None:
    if device is None:
        return None
    if isinstance(device, int):
        return "cuda"
    return torch.device(device).type


class VirtualDevice(TorchFunctionMode):
    """Inside, ``meta`` is a second device holding real data (``VirtualTensor``); ``mixed`` lists every op
    (forward or backward) that got tensors of both devices."""

    def __init__(self) -> None:
        super().__init__()
        self.mixed: list[str] = []

    def __enter__(self):
        _RECORDERS.append(self.mixed)
        return super().__enter__()

    def __exit__(self, *exc):
        _RECORDERS.remove(self.mixed)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args[1:], **kwargs)
            src = args[0]
            target = _device_type(device)
            if target == "meta" and not isinstance(src, VirtualTensor):
                src = _to_virtual(src)
            elif target == "cpu" and isinstance(src, VirtualTensor):
                src = _to_cpu(src)
            return src.to(dtype) if dtype is not None else src
        if func is torch.Tensor.cpu:
            return _to_cpu(args[0])
        if func is torch.Tensor.tolist:
            return _unwrap(args[0]).tolist()
        if _device_type(kwargs.get("device")) == "meta":  # a factory: build on the CPU, then wrap
            out = func(*args, **{**kwargs, "device": "cpu"})
            return tree_map(lambda t: VirtualTensor(t) if isinstance(t, torch.Tensor) else t, out)
        return func(*args, **kwargs)


def place(module: torch.nn.Module, device: torch.device | str) -> None:
    """Move ``module``'s own and its submodules' parameters and buffers to ``device`` (``cpu`` or ``meta``) inside
    a ``VirtualDevice`` mode, keeping each parameter's ``requires_grad``."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = torch.nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = b.to(device)
