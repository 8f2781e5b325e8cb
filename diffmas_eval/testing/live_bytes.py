"""``LiveBytes``: the bytes of the tensors torch allocates inside it, their peak, and a fake out-of-memory error.

A CPU has no out-of-memory exception and resident memory cannot see what a tensor would hold, so tests that need
an allocation count or a memory limit use this: every dispatched op's outputs are counted by storage (a view or
an in-place result shares an input's storage and is not counted), and released when the last tensor object over
the storage dies. Past ``budget`` it raises the CPU allocator's own out-of-memory message, which accelerate's
``find_executable_batch_size`` shrinks on. It does not see memory held outside torch's dispatcher, nor any
allocator's caching or fragmentation.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

OOM = "DefaultCPUAllocator: can't allocate memory"


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors allocated inside that are alive (``total``), their ``peak``, and a fake out-of-memory
    error past ``budget``."""

    def __init__(self, budget: int | None = None) -> None:
        super().__init__()
        self.budget, self.total, self.peak = budget, 0, 0
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, tensor objects over it]

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.total -= entry[0]
                del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view or an in-place result shares an input's storage: not an allocation (and a view of a weight made
        # before the mode must not count the weight)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if not key or (key in inputs and key not in self.live):
                    continue
                if key in self.live:
                    self.live[key][1] += 1
                else:
                    self.live[key] = [storage.nbytes(), 1]
                    self.total += storage.nbytes()
                weakref.finalize(t, self._release, key)
        self.peak = max(self.peak, self.total)
        if self.budget is not None and self.total > self.budget:
            raise RuntimeError(f"{OOM} (fake: {self.total} live bytes > budget {self.budget})")
        return out
