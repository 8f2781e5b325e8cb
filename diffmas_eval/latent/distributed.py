"""Where the chain's layers run and how their weights are sharded: FSDP2 re-gathering and device maps.

The chain writes each layer's KV cache in place, past the hooks FSDP2 and accelerate put on a layer's outputs, so
it needs to know which module owns each layer (``fsdp_layers``: FSDP2 units; ``unshard_in_backward``: gather a
layer before a gradient reaches its cache) and where each layer runs (``layer_devices``: a ``device_map``'s
execution devices). ``CallThrough`` is what a trainer hands the chain as its model under DDP/FSDP: calls go
through the wrapper, attributes to the model inside; ``sharded_layers`` looks through it by its public
``wrapped``, so the chain reads no trainer's private attributes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..compat.accelerate import execution_device

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # torch without FSDP2
    FSDPModule = None


class CallThrough(nn.Module):
    """What the chain gets as its model under DDP/FSDP: calls go through ``wrapped`` (so the wrapper syncs
    gradients), attribute reads (``config``, ``get_input_embeddings``) go to ``inner``, the model inside, which
    the wrappers do not expose. Neither is registered as a submodule (no second parameter copy)."""

    def __init__(self, wrapped: nn.Module, inner: nn.Module):
        super().__init__()
        object.__setattr__(self, "wrapped", wrapped)
        object.__setattr__(self, "inner", inner)
        del self.__dict__["training"]  # read the inner model's train/eval mode

    def forward(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(object.__getattribute__(self, "inner"), name)


def sharded_layers(model: nn.Module) -> dict[int, nn.Module]:
    """``fsdp_layers`` of the module a call of ``model`` goes through (a ``CallThrough``'s ``wrapped``)."""
    return fsdp_layers(model.wrapped if isinstance(model, CallThrough) else model)


def fsdp_layers(model: nn.Module) -> dict[int, nn.Module]:
    """Decoder layers sharded by FSDP2 (``fully_shard``), by the ``layer_idx`` of their attention: each
    is the FSDP unit that owns the weights writing that layer's cache. Empty for an unsharded model."""
    if FSDPModule is None:
        return {}
    found = {}
    for module in model.modules():
        if isinstance(module, FSDPModule):
            idx = next((c.layer_idx for c in module.modules()
                        if c is not module and isinstance(getattr(c, "layer_idx", None), int)), None)
            if idx is not None and idx not in found:
                found[idx] = module
    return found


def unshard_in_backward(layers: dict[int, nn.Module], keys: list, values: list) -> None:
    """FSDP2 re-gathers a layer's weights for backward through hooks on the layer's *outputs*; the KV
    cache bypasses them (a layer writes it in place and returns only its hidden state), so under
    ``reshard_after_forward=True`` a gradient reaching an earlier agent's cache columns (the final
    agent's attention into the trace) would run that layer's backward on freed weights. A hook on each
    cache tensor gathers the layer first; ``unshard`` is a no-op when it is already gathered, and
    FSDP2's end-of-backward callback reduce-scatters what this adds."""
    for idx, layer in layers.items():
        for t in (keys[idx], values[idx]):
            if t is not None and t.requires_grad:
                t.register_hook(lambda grad, layer=layer: (layer.unshard(), grad)[1])


def layer_devices(model: nn.Module) -> dict[int, torch.device]:
    """Where each decoder layer runs (by its attention's ``layer_idx``): the execution device of the innermost
    accelerate hook above it (``device_map``; offloaded weights sit elsewhere), else the device of its weights.
    Innermost: ``dispatch_model`` also hooks the whole model, with the *main* device (the first GPU) as its
    execution device, and that hook must not place a layer that runs on the second GPU."""
    hooked: dict[str, torch.device] = {}
    for name, module in model.named_modules():
        device = execution_device(module)
        if device is not None:
            hooked[name] = torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    found: dict[int, torch.device] = {}
    for name, module in model.named_modules():
        idx = getattr(module, "layer_idx", None)
        if not isinstance(idx, int) or idx in found:
            continue
        above = [n for n in hooked if n == "" or name == n or name.startswith(n + ".")]
        if above:
            found[idx] = hooked[max(above, key=len)]
            continue
        weight = next(module.parameters(), None)
        if weight is not None:
            found[idx] = weight.device
    return found
