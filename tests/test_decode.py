"""The decode loop of ``AgentChain.generate`` against HF ``generate``: when it stops, and what it allocates.

Both are measured, not inferred: a forward hook counts the model's forwards, and ``peak_allocated`` replays
torch's allocation events (a KV reservation that is never written costs no resident memory, so only the
allocator's own count shows it).
"""

from __future__ import annotations

import torch

from diffmas_eval.latent import AgentChain, LatentConfig
from diffmas_eval.prompts import default_roles
from diffmas_eval.testing.alloc import peak_allocated
from diffmas_eval.testing.tiny import make_tiny_model

QUESTIONS = [
    "What is 2 + 3?",
    "Name a prime number greater than ten, please.",
    "Why?",
    "The quick brown fox jumps over the lazy dog twice.",
]


def _ending_at(free: list[list[int]], start: int) -> list[int]:
    """EOS ids that end every row of the free-running answers ``free`` at step ``start`` or later: for each row not
    yet ended by an earlier pick, its first token from ``start`` on that no row makes before ``start``."""
    early = {t for row in free for t in row[:start]}
    eos: set[int] = set()
    for row in free:
        if not eos & set(row):
            eos.add(next(t for t in row[start:] if t not in early))
    return sorted(eos)


def _first_end(row: list[int], eos: list[int]) -> int:
    return next((j for j, t in enumerate(row) if t in eos), len(row))


@torch.no_grad()
def _hf_generate(model, tok, prompts: list[list[int]], new: int) -> list[list[int]]:
    """HF ``generate`` on the left-padded batch: each row's new tokens up to (not including) its first EOS."""
    width = max(map(len, prompts))
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad)
    eos = model.generation_config.eos_token_id
    return [row[: _first_end(row, eos)] for row in out[:, width:].tolist()]


@torch.no_grad()
def test_decode_stops_when_the_batch_is_done_like_hf_generate():
    """agents=1, real EOS, rows ending at different steps: the chain's loop runs exactly as many forwards as HF
    ``generate`` (prefill + one per token but the last), and every row's tokens are HF's. The old loop read its
    stop state at chunk boundaries (steps 1..8, 10, 12, 15, ..) and ran on to the next one."""
    model, tok = make_tiny_model("qwen3")
    chain = AgentChain(model, tok, LatentConfig(roles=default_roles(1)))
    prompts = [chain.final_prompt(q) for q in QUESTIONS]
    trace = chain.stage1(QUESTIONS)  # agents=1: an empty trace
    free = [g.token_ids for g in chain.generate(trace, prompts, max_new_tokens=64, ignore_eos=True)]
    eos = _ending_at(free, 16)
    model.generation_config.eos_token_id = eos
    ends = [_first_end(row, eos) for row in free]
    last = max(ends)
    # rows end at different steps, the batch mid-budget and off the old loop's read points (made = 1..7, 9, 11, 14,
    # 18, 23, 30, 39, 51: else the old loop would pass too)
    assert len(set(ends)) > 1 and 16 <= last < 63 and last + 1 not in (18, 23, 30, 39, 51), ends
    calls: list[int] = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    gens = chain.generate(trace, prompts, max_new_tokens=64)
    chain_forwards, calls[:] = len(calls), []
    ref = _hf_generate(model, tok, prompts, 64)
    hf_forwards = len(calls)
    hook.remove()
    assert [g.token_ids for g in gens] == ref
    assert [g.stats.stopped for g in gens] == ["eos"] * len(prompts)
    assert chain_forwards == hf_forwards == last + 1, (chain_forwards, hf_forwards, last)


@torch.no_grad()
def test_decode_peak_allocation_does_not_scale_with_max_new_tokens():
    """A budget of 32,768 new tokens whose answers end within 20 allocates what a budget of 64 does: the KV
    cache grows as it fills instead of reserving the budget for every row (the old loop reserved 32,768 columns:
    64 MiB here, 150 GB at batch 32 on Qwen3-8B), and the token buffers hold one read chunk. Also within 1.2x of
    HF ``generate``'s peak on the same batch."""
    model, tok = make_tiny_model("qwen3", context=40960)
    chain = AgentChain(model, tok, LatentConfig(roles=default_roles(1)))
    prompts = [chain.final_prompt(q) for q in QUESTIONS]
    trace = chain.stage1(QUESTIONS)
    free = [g.token_ids for g in chain.generate(trace, prompts, max_new_tokens=20, ignore_eos=True)]
    model.generation_config.eos_token_id = sorted({row[-1] for row in free})  # every row ends within 20
    peaks = {}
    for budget in (64, 32768):
        peaks[budget], gens = peak_allocated(lambda budget=budget: chain.generate(trace, prompts, budget))
        assert all(g.stats.stopped == "eos" for g in gens)
    hf, _ = peak_allocated(lambda: _hf_generate(model, tok, prompts, 32768))
    assert peaks[32768] <= 1.05 * peaks[64], peaks
    assert peaks[32768] <= 1.2 * hf, (peaks, hf)
