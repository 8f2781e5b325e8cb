"""``--batch_size auto`` for ``diffmas``: how many rows a DiffMAS batch can hold.

``hf`` sizes a batch for one forward over the longest request. A DiffMAS row holds much more: the
latent trace (every upstream agent's prompt plus its latent steps, kept as KV cache for the final
agent), then the final agent's prompt and answer on top of it. ``RowCost`` estimates one row's peak
bytes from the model config; on a CPU the batch size comes from that estimate and the free memory
(probing for out-of-memory on a CPU means swapping or being killed, not an exception), on CUDA the
model class probes with the real chain, as ``hf`` does (see ``DiffMASLM._auto_batch_size``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .. import memory

CPU_SHARE = 0.5  # of the free memory a CPU run may plan to use (the rest: allocator slack, other processes)
# of the largest batch a CUDA probe ran that ``auto`` uses: the probe runs the real path once, with the batch's
# longest and shortest rows; the rest is for fragmentation over a long run and rows the probe did not build
PROBE_SHARE = 0.85


@dataclass
class RowCost:
    """One row's peak memory, in bytes, for a trace of ``trace`` positions and a final agent of ``final``.

    ``bytes_per_position``: the KV cache one row holds per position, from ``memory.bytes_per_position``,
    the package's one estimate (the same as ``diffmas-eval memory`` and a real trace's own accounting),
    so head_dim set apart, separate key/value widths and layers without a cache count as they are.
    """

    bytes_per_position: int
    heads: int
    hidden: int
    intermediate: int
    vocab: int
    dtype_bytes: int

    @classmethod
    def of(cls, model) -> RowCost:
        cfg = model.config.get_text_config()
        heads = cfg.num_attention_heads
        return cls(bytes_per_position=memory.bytes_per_position(model), heads=heads,
                   hidden=cfg.hidden_size, intermediate=getattr(cfg, "intermediate_size", 4 * cfg.hidden_size),
                   vocab=cfg.vocab_size, dtype_bytes=next(model.parameters()).element_size())

    def row(self, trace: int, final: int, prefill: int, scored: int = 1) -> int:
        """Peak bytes of one row.

        ``trace``: positions the upstream agents write (prompts + latent steps); ``final``: the final
        agent's prompt + answer (tokens generated or continuation scored); ``prefill``: the longest
        single forward (an agent's prompt); ``scored``: positions whose logits are read.
        The KV cache counts twice: the trace is copied when rows are selected for scoring, and a
        growing cache is concatenated (old and new tensors live together for a moment). Activations:
        hidden states and the MLP of the longest forward, and eager attention's score matrix.
        Logits are float32, with their log-softmax.
        """
        kv = 2 * self.bytes_per_position * (trace + final)
        mlp = prefill * (6 * self.hidden + 3 * self.intermediate) * self.dtype_bytes
        attention = 2 * self.heads * prefill * (trace + final) * self.dtype_bytes
        logits = 2 * scored * self.vocab * 4
        return kv + mlp + attention + logits


def available_memory() -> int:
    """Bytes a new allocation can take on this machine now: MemAvailable, or a cgroup limit if lower."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:  # containers: the cgroup v2 limit minus what the group uses
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(0, free)


class NoRowFitsError(MemoryError):
    """``--batch_size auto`` found no room for even one row: a clear error instead of a batch of 1 that
    would then be killed (CPU) or run out of memory mid-run (CUDA)."""


FIXES = ("lower latent_steps, agents or max_gen_toks (or max_length), shard the model (parallelize=True), or "
         "pass a fixed --batch_size 1 to try anyway")


def cpu_batch_size(per_row: int, max_batch_size: int | None, free: int | None = None) -> int:
    """Rows that fit in ``CPU_SHARE`` of the free memory, at most ``max_batch_size``; refuses (rather
    than answering 1) when not even one row fits."""
    free = available_memory() if free is None else free
    size = int(free * CPU_SHARE) // max(1, per_row)
    if size < 1:
        raise NoRowFitsError(
            f"diffmas batch_size auto: one row needs about {per_row / 2**20:,.0f} MiB at its peak but "
            f"{CPU_SHARE:.0%} of the free memory is {free * CPU_SHARE / 2**20:,.0f} MiB; {FIXES}")
    return min(size, max_batch_size) if max_batch_size else size


def parse_batch_size(model: str, batch_size) -> tuple[int | str, float]:
    """``8`` -> (8, 1); ``auto`` -> ("auto", 1); ``auto:4`` -> ("auto", 4.0) (recompute 4 times, as hf)."""
    text = str(batch_size).strip()
    if text.isdigit() and int(text) > 0:
        return int(text), 1.0
    head, _, tail = text.partition(":")
    if head == "auto":
        try:
            schedule = float(tail) if tail else 1.0
        except ValueError:
            schedule = 0.0
        if schedule >= 1:
            return "auto", schedule
    raise ValueError(f"{model} batch_size must be a positive integer, auto or auto:N (got {batch_size!r}), "
                     "e.g. --batch_size 8 or --batch_size auto")
