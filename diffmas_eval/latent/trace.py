"""The latent trace: one growing KV cache shared by all agents, plus the bookkeeping around it.

**The layout invariant.** Every row of the trace is left-aligned as a whole: its pad columns come
first, then all of its real columns, contiguous, up to the last column. A new segment is appended
right-padded (each row's real tokens follow its trace directly), and ``left_align`` then rotates
each row's trailing pad columns to its front. Three facts make a row's numbers independent of the
rest of the batch, for every attention layout transformers builds from column indices (full,
causal, sliding window, padding):

1. Between two real columns of a row, the column distance equals the position distance, because no
   pad column sits between them. So a sliding window of ``w`` columns holds exactly the ``w`` real
   positions it holds when the row runs alone, and causality by column is causality by position.
2. RoPE positions count real tokens only (``positions``) and are baked into the cached keys, so
   moving a key to another column changes nothing it carries.
3. Pad columns are masked out, and attention over cached keys is a sum over columns: their order
   does not matter. The trailing pad queries of a right-padded block are never read.

Independent segments (``trace=stitch``, ``topology=hierarchical``; ``chain.py``) restart positions per
segment, so fact 1 holds within a segment only; the row is still laid out the same whether it runs in a
batch or alone, which is all that batching needs (facts 2 and 3 are unchanged).

Forwards never mutate the trace: each call gets a fresh cache object over the same tensors (see
``cache``), so readers (scoring, generation) cannot extend the shared trace, and the autograd graph
through the tensors is kept (``left_align`` is a differentiable gather).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


@dataclass(eq=False)
class Segment:
    """What one agent wrote: ``prompt`` columns (the widest row's prompt) and ``latent`` columns.

    ``real``: per row, the segment's real positions (its prompt tokens + ``latent``); with the trace
    left-aligned they are each row's last ``real[i]`` columns right after the agent ran.
    ``keys``/``values`` (the gradient probe only): the whole trace right after this agent.
    ``prompt_ids``/``latents`` (``stage1(record_inputs=True)``): what the agent fed the model, per row
    its prompt's token ids and ``[B, latent, hidden]`` realigned vectors: the trace as a sequence of
    input embeddings, e.g. for an engine that takes prompt embeddings (``stage2_vllm``).
    """

    agent: str
    prompt: int
    latent: int
    real: list[int]
    keys: list[torch.Tensor] | None = None
    values: list[torch.Tensor] | None = None
    prompt_ids: list[list[int]] | None = None
    latents: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.prompt + self.latent


def _layer_over(keys: torch.Tensor | None, values: torch.Tensor | None) -> DynamicLayer:
    layer = DynamicLayer()
    if keys is not None:
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values  # share, don't copy: keeps the autograd graph
    return layer


class GrowingLayer(DynamicLayer):
    """A cache layer with spare columns after its own, written in place by each forward, grown as it fills.

    ``DynamicLayer`` concatenates: every new token copies the whole cache, so decoding T tokens over a
    trace moves O(T^2) bytes (it dominates long answers). Here the trace is copied once into a buffer
    with a few spare columns; a forward writes only its new columns. The spare room grows in chunks that
    double (``FIRST_CHUNK``, then twice the last chunk, ...), capped at ``reserve`` columns in all: a
    budget of 32k new tokens is not paid for up front (at batch 32 on Qwen3-8B that reservation alone was
    about 150 GB), only the tokens made so far are, at most twice over, and the trace itself is never
    doubled (the spare room follows the answer's length, not the trace's). Growing copies the buffer:
    O(log T) copies over T tokens, one layer at a time (each layer grows in its own ``update``), so the
    transient is one layer's buffer. In-place writes would break autograd, so ``LatentTrace.cache`` uses
    it only without it.
    """

    FIRST_CHUNK = 64

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, reserve: int):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.length = keys.shape[-2]
        self.limit = self.length + reserve  # the most columns this layer will be asked to hold
        self.chunk = min(reserve, self.FIRST_CHUNK)
        self._k = self._buffer(keys, self.length + self.chunk)
        self._v = self._buffer(values, self.length + self.chunk)
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    @staticmethod
    def _buffer(t: torch.Tensor, capacity: int) -> torch.Tensor:
        buf = t.new_empty(*t.shape[:2], capacity, t.shape[-1])
        buf[:, :, :t.shape[-2]] = t
        return buf

    @property
    def capacity(self) -> int:
        """Columns the buffers hold now (used and spare)."""
        return self._k.shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self.chunk = max(1, 2 * self.chunk)
            capacity = self.capacity + self.chunk
            capacity = max(end, min(self.limit, capacity) if end <= self.limit else capacity)
            self.keys = self._k = self._buffer(self.keys, capacity)  # the old buffer is freed here
            self.values = self._v = self._buffer(self.values, capacity)
        self._k[:, :, self.length:end] = key_states
        self._v[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values


def left_aligned_mask(real: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, width]``: 0 for the first ``width - real[i]`` columns of row i, then 1."""
    cols = torch.arange(width, device=real.device)
    return (cols[None, :] >= (width - real)[:, None]).long()


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
        """Bytes one row holds per position: per layer kept, its key (kv_heads x key_dim) and its value
        (kv_heads x value_dim), each in its own tensor's dtype; 0 before the first segment.

        It measures the tensors the trace holds (keys and values apart: DeepSeek's MLA caches a latent
        and a RoPE key of different widths; a layer without a cache holds none). It therefore equals the
        package's estimate from the config alone, ``diffmas_eval.memory.bytes_per_position(model)``
        (used by ``diffmas-eval memory`` and ``--batch_size auto``), for a trace stored in the model's
        dtype, which stage 1 guarantees (``latent_dtype=float32`` casts back): the estimate reads the
        same cache shapes off a one-token forward on ``meta``. ``tests/test_memory.py`` checks they agree.
        """
        return sum(t[0, :, 0].nelement() * t.element_size()
                   for t in (*self.keys, *self.values) if t is not None and t.shape[0] > 0)

    # -- reading and writing ----------------------------------------------------------------------
    def cache(self, reserve: int = 0) -> DynamicCache:
        """A fresh cache object over the trace tensors; a forward extends it, not the trace.

        ``reserve`` (only without autograd): copy the trace once into buffers with that many spare
        columns, which forwards then fill in place (``GrowingLayer``): for decoding and latent steps.
        """
        cache = DynamicCache()
        if reserve > 0 and not torch.is_grad_enabled() and self.keys[0] is not None:
            cache.layers = [GrowingLayer(k, v, reserve) for k, v in zip(self.keys, self.values)]
        else:
            cache.layers = [_layer_over(k, v) for k, v in zip(self.keys, self.values)]
        cache.layer_class_to_replicate = None
        return cache

    def decode_cache(self, reserve: int) -> DynamicCache:
        """``cache(reserve)`` that takes the trace's tensors over: each layer is copied into its growing buffer
        and this trace's own reference to it dropped, layer by layer, so the trace and its copy are never held
        whole at once (decoding over a prefilled fork: the fork's columns live on in the cache only). The
        trace then holds no tensors; ``mask``, ``next_pos`` and ``advance`` still work. Only without autograd."""
        if torch.is_grad_enabled() or self.keys[0] is None or reserve <= 0:
            return self.cache(reserve)
        cache = DynamicCache()
        cache.layers = []
        for i in range(len(self.keys)):
            k, v = self.keys[i], self.values[i]
            self.keys[i] = self.values[i] = None
            cache.layers.append(GrowingLayer(k, v, reserve))
            del k, v
        cache.layer_class_to_replicate = None
        return cache

    def positions(self, new_mask: torch.Tensor) -> torch.Tensor:
        """RoPE positions of new columns: continue each row's count of real tokens (pads get 0)."""
        return (self.next_pos[:, None] + new_mask.cumsum(-1) - 1).clamp(min=0) * new_mask

    def full_mask(self, new_mask: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.mask, new_mask], dim=1)

    def adopt(self, cache: DynamicCache, new_mask: torch.Tensor) -> None:
        """Take over the tensors of a cache that a forward extended by ``new_mask``'s columns."""
        self.keys = [layer.keys for layer in cache.layers]
        self.values = [layer.values for layer in cache.layers]
        self.advance(new_mask)

    def advance(self, new_mask: torch.Tensor) -> None:
        """Account for columns appended to a cache built from this trace."""
        self.mask = self.full_mask(new_mask)
        self.next_pos = self.next_pos + new_mask.sum(-1)

    def adopt_extended(self, keys: list[torch.Tensor], values: list[torch.Tensor], added: torch.Tensor) -> None:
        """Take over the (left-aligned) tensors of this trace extended by ``added[i]`` real positions per row.

        How stage 1 appends an agent's segment: the agent ran on a fork (``AgentChain._agent``), and this
        trace adopts the tensors it produced, growing its mask and positions by ``added``. Unlike ``adopt``
        (a cache a forward just extended by right-padded columns), the tensors are already left-aligned.
        """
        width = keys[0].shape[-2]
        self.keys, self.values = list(keys), list(values)
        self.mask = left_aligned_mask(self.mask.sum(-1) + added, width)
        self.next_pos = self.next_pos + added

    def left_align(self) -> None:
        """Restore the layout invariant after a right-padded append: rotate each row's trailing pad
        columns to its front (one gather per layer, only when some row has trailing pads)."""
        width = self.length
        shift = width - 1 - (self.mask * torch.arange(width, device=self.mask.device)).argmax(-1)
        shift = torch.where(self.mask.any(-1), shift, 0)
        if not bool(shift.any()):
            return
        src = (torch.arange(width, device=shift.device)[None, :] - shift[:, None]) % width  # [B, T]

        def rotate(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            index = src.to(t.device)  # a sharded model (device_map) keeps each layer's trace on its device
            return t.gather(-2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1]))

        self.keys = [rotate(k) for k in self.keys]
        self.values = [rotate(v) for v in self.values]
        self.mask = self.mask.gather(1, src)

    def fork(self) -> LatentTrace:
        """A shallow copy: same tensors, own lists, so extending it leaves this trace as it is."""
        return self.select(None)

    def add_segment(self, segment: Segment) -> None:
        self.segments.append(segment)
        self.history.append(segment)

    def keep_last_segment(self) -> None:
        """The ``overwrite`` ablation: drop everything but the latest agent's segment.

        Each row keeps its last ``real[i]`` columns (the segment's, by the layout invariant); the
        columns of earlier segments that the widest row's slice still holds are masked out, which
        keeps the trace left-aligned. Positions keep counting (RoPE is already baked into the keys).
        """
        if len(self.segments) <= 1:
            return
        last = self.segments[-1]
        start = self.length - last.length
        self.keys = [k[:, :, start:].contiguous() for k in self.keys]
        self.values = [v[:, :, start:].contiguous() for v in self.values]
        self.mask = left_aligned_mask(torch.tensor(last.real, device=self.mask.device), last.length)
        self.segments = [last]

    def select(self, rows: torch.Tensor | list[int] | None) -> LatentTrace:
        """A trace over the given rows (repeats allowed; None: all rows, tensors shared not copied).

        Used to share one context's trace among all of its continuations.
        """
        def pick(t):
            # a sharded model (device_map) keeps each layer's trace on that layer's device: index it there
            return t if t is None or rows is None else t.index_select(0, rows.to(t.device))

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
             "real": s.real[0] if s.real else 0, "bytes": s.length * per_pos, "kept": s in self.segments}
            for s in self.history
        ]
