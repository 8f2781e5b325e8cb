"""Stage 1's peak memory, before and after it stopped keeping what it does not read, in one process.

Two changes, each against the code it replaced (restored here by a patch, not kept in the package):

- ``hidden``: stage 1 reads the last layer's hidden state through a hook on the decoder instead of asking
  the model for every layer's (``output_hidden_states=True``, the old path: ``decoder_of`` patched to None);
- ``float32``: ``latent_dtype=float32`` on a bfloat16 model casts module by module instead of casting the
  whole model for all of stage 1 (what ``upcast_modules``, then ``_upcast``, did before).

Peak memory is the process's peak RSS above its RSS before each run (Linux: ``/proc/self/clear_refs`` resets
the peak, so every variant is measured in this one process); each variant runs ``--repeats`` times in
alternating order after one warm-up run, and the smallest peak is kept. On a GPU read
``torch.cuda.max_memory_allocated`` instead (``benchmarks/gpu/run.py``).

    python benchmarks/stage1_memory.py --questions 8 --latent-steps 10 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffmas_eval import DEFAULT_MODEL  # noqa: E402
from diffmas_eval.latent import AgentChain, LatentConfig  # noqa: E402
from diffmas_eval.latent import chain as chain_module  # noqa: E402
from diffmas_eval.models import load_model  # noqa: E402
from diffmas_eval.tasks.utils import read_jsonl  # noqa: E402


def status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _libc():
    """glibc keeps freed memory mapped (and raises its mmap threshold after large frees), so a tensor freed by
    one variant would be reused by the next without raising its RSS: a fixed threshold puts every large
    tensor in its own mapping, returned on free, and ``malloc_trim`` hands back the rest before each run."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, not dynamic
        return libc
    except (OSError, AttributeError):
        return None


LIBC = _libc()


def peak_above_now(fn) -> int:
    """Peak RSS while ``fn`` runs, above the RSS before it (resets the kernel's peak first)."""
    gc.collect()
    if LIBC is not None:
        LIBC.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before


@contextlib.contextmanager
def whole_model_upcast(model):
    """The old ``latent_dtype=float32``: every half tensor in float32 for all of stage 1."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.dtype in chain_module.HALF]
    dtypes = [t.dtype for t in tensors]
    for t in tensors:
        t.data = t.data.float()
    try:
        yield
    finally:
        for t, dtype in zip(tensors, dtypes):
            t.data = t.data.to(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--latent-steps", type=int, nargs="+", default=[0, 10],
                        help="each value is measured (0: the upstream agents' prompt prefills alone)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    data = Path(os.environ.get("DIFFMAS_DATA_DIR", ROOT.parent / "shared" / "data"))
    questions = [r["question"] for r in read_jsonl(data / "gsm8k" / "test.jsonl", ("question",))[:args.questions]]
    torch.set_grad_enabled(False)
    model, tok = load_model(DEFAULT_MODEL, device="cpu")  # float32 on CPU
    new_decoder, new_upcast = chain_module.decoder_of, chain_module.upcast_modules

    def stage1(steps: int, latent_dtype: str = "model"):
        config = LatentConfig(latent_steps=steps, latent_dtype=latent_dtype)
        return lambda: AgentChain(model, tok, config).stage1(questions)

    def variant(old: bool, what: str, steps: int):
        chain_module.decoder_of = (lambda m: None) if old and what == "hidden" else new_decoder
        chain_module.upcast_modules = whole_model_upcast if old and what == "float32" else new_upcast
        try:
            return peak_above_now(stage1(steps, "float32" if what == "float32" else "model"))
        finally:
            chain_module.decoder_of, chain_module.upcast_modules = new_decoder, new_upcast

    rows = []
    for what, steps in [(w, m) for w in ("hidden", "float32") for m in args.latent_steps]:
        if what == "float32":
            model.to(torch.bfloat16)
        peaks: dict[str, list[int]] = {"before": [], "after": []}
        variant(False, what, steps)  # warm-up: the allocator's and the first call's one-time costs count for neither
        for r in range(args.repeats):
            for old in ((True, False) if r % 2 == 0 else (False, True)):
                peaks["before" if old else "after"].append(variant(old, what, steps))
        before, after = min(peaks["before"]), min(peaks["after"])
        print(f"{what}, {steps} latent steps: before {peaks['before']} after {peaks['after']}", file=sys.stderr,
              flush=True)
        rows.append({"change": what, "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                     "questions": len(questions), "latent_steps": steps,
                     "peak_before_mib": round(before / 2**20, 1), "peak_after_mib": round(after / 2**20, 1),
                     "after_over_before": round(after / before, 3) if before else None})
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model {DEFAULT_MODEL}: {weights / 2**20:.0f} MiB of weights in bfloat16; {len(questions)} GSM8K "
          "questions in one batch, 4 agents; peak RSS of stage 1 above the RSS before it (CPU, smallest of the "
          "repeats)\n")
    print("| change | model dtype | latent steps | before MiB | after MiB | after / before |\n"
          "|---|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['change']} | {row['model_dtype']} | {row['latent_steps']} | {row['peak_before_mib']} | "
              f"{row['peak_after_mib']} | {row['after_over_before']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
