"""The latent trace: one growing KV cache shared by all agents, plus the bookkeeping around it.

A batch row's real tokens are scattered across segments (each segment is left-padded on its own),
so the trace carries one attention mask for the whole width and each row's next RoPE position.
Positions count real tokens only, which is what makes a padded row compute exactly the numbers of
the same row run alone. Forwards never mutate the trace: each call gets a fresh cache object over
the same tensors (see ``cache``), so readers (scoring, generation) cannot extend the shared trace,
and the autograd graph through the tensors is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


@dataclass(eq=False)
class Segment:
    """Positions ``[start, end)`` of the trace written by one agent (``prompt`` + ``latent`` columns)."""

    agent: str
    start: int
    end: int
    prompt: int
    latent: int
    keys: list[torch.Tensor] | None = None  # kept only for the gradient probe
    values: list[torch.Tensor] | None = None

    @property
    def length(self) -> int:
        return self.end - self.start


def _layer_over(keys: torch.Tensor | None, values: torch.Tensor | None) -> DynamicLayer:
    layer = DynamicLayer()
    if keys is not None:
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values  # share, don't copy: keeps the autograd graph
    return layer


class LatentTrace:
    def __init__(self, batch: int, num_layers: int, device: torch.device | str):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.mask = torch.zeros(batch, 0, dtype=torch.long, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.segments: list[Segment] = []  # what the trace holds now
        self.history: list[Segment] = []  # everything ever appended (overwrite mode drops segments)

    # -- shape and cost ---------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.nelement() * t.element_size() for t in [*self.keys, *self.values] if t is not None)

    def bytes_per_position(self) -> int:
        """2 (K and V) x layers x kv_heads x head_dim x bytes, for one row."""
        if self.keys[0] is None:
            return 0
        return sum(2 * k[0, :, 0].nelement() * k.element_size() for k in self.keys)

    # -- reading and writing ----------------------------------------------------------------------
    def cache(self) -> DynamicCache:
        """A fresh cache object over the trace tensors; a forward extends it, not the trace."""
        cache = DynamicCache()
        cache.layers = [_layer_over(k, v) for k, v in zip(self.keys, self.values)]
        cache.layer_class_to_replicate = None
        return cache

    def positions(self, new_mask: torch.Tensor) -> torch.Tensor:
        """RoPE positions of new columns: continue each row's count of real tokens (pads get 0)."""
        return (self.next_pos[:, None] + new_mask.cumsum(-1) - 1).clamp(min=0) * new_mask

    def full_mask(self, new_mask: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.mask, new_mask], dim=1)

    def append(self, keys: list[torch.Tensor], values: list[torch.Tensor], new_mask: torch.Tensor) -> None:
        """Concatenate new columns (one per layer, ``[B, kv_heads, n, head_dim]``) after the trace."""
        self.keys = [k if old is None else torch.cat([old, k], dim=-2) for old, k in zip(self.keys, keys)]
        self.values = [v if old is None else torch.cat([old, v], dim=-2) for old, v in zip(self.values, values)]
        self.advance(new_mask)

    def adopt(self, cache: DynamicCache, new_mask: torch.Tensor) -> None:
        """Take over the tensors of a cache that a forward extended by ``new_mask``'s columns."""
        self.keys = [layer.keys for layer in cache.layers]
        self.values = [layer.values for layer in cache.layers]
        self.advance(new_mask)

    def advance(self, new_mask: torch.Tensor) -> None:
        """Account for columns appended to a cache built from this trace."""
        self.mask = self.full_mask(new_mask)
        self.next_pos = self.next_pos + new_mask.sum(-1)

    def fork(self) -> LatentTrace:
        """A shallow copy: same tensors, own lists, so extending it leaves this trace as it is."""
        return self.select(None)

    def add_segment(self, segment: Segment) -> None:
        self.segments.append(segment)
        self.history.append(segment)

    def keep_last_segment(self) -> None:
        """The ``overwrite`` ablation: drop everything but the latest agent's segment.

        Positions keep counting (RoPE is already baked into the cached keys).
        """
        if len(self.segments) <= 1:
            return
        start = self.segments[-1].start
        self.keys = [k[:, :, start:].contiguous() for k in self.keys]
        self.values = [v[:, :, start:].contiguous() for v in self.values]
        self.mask = self.mask[:, start:]
        last = self.segments[-1]
        last.start, last.end = 0, last.length
        self.segments = [last]

    def select(self, rows: torch.Tensor | list[int] | None) -> LatentTrace:
        """A trace over the given rows (repeats allowed; None: all rows, tensors shared not copied).

        Used to share one context's trace among all of its continuations.
        """
        def pick(t):
            return t if t is None or rows is None else t.index_select(0, rows)

        if rows is not None:
            rows = torch.as_tensor(rows, dtype=torch.long, device=self.mask.device)
        out = LatentTrace(0, len(self.keys), self.mask.device)
        out.keys = [pick(k) for k in self.keys]
        out.values = [pick(v) for v in self.values]
        out.mask = pick(self.mask)
        out.next_pos = pick(self.next_pos)
        out.segments = list(self.segments)
        out.history = list(self.history)
        return out

    def table(self) -> list[dict]:
        """One row per agent segment ever written: agent, columns, real positions of row 0, bytes."""
        per_pos = self.bytes_per_position() * self.batch
        return [
            {"agent": s.agent, "prompt": s.prompt, "latent": s.latent, "positions": s.length,
             "bytes": s.length * per_pos, "kept": s in self.segments}
            for s in self.history
        ]
