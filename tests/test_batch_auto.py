"""``--batch_size auto`` on CUDA probes for out-of-memory; it must never pick a size that runs out mid-run.

A CPU has no out-of-memory exception to probe for (it swaps or is killed), so this test fakes one:
``diffmas_eval.testing.live_bytes.LiveBytes`` counts the bytes of every tensor allocated inside it and raises the
CPU allocator's own out-of-memory error once the live total passes a budget, which is what accelerate's
``find_executable_batch_size`` shrinks on. It does not see the CUDA caching allocator's fragmentation (which
``PROBE_SHARE`` leaves room for), nor memory held outside torch.

The model is a tiny llama shaped so that the KV cache, not eager attention's scores, is the largest tensor, as in
a long trace on a real model (head_dim 128, 4 KV heads, sdpa).
"""

from __future__ import annotations

import pytest
from lm_eval.api.instance import Instance

from diffmas_eval.harness.batching import PROBE_SHARE
from diffmas_eval.harness.diffmas_lm import DiffMASLM
from diffmas_eval.testing.live_bytes import LiveBytes
from diffmas_eval.testing.tiny import save_tiny_model


@pytest.fixture(scope="module")
def kv_heavy(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("kv") / "llama", "llama", head_dim=128, num_key_value_heads=4)


def requests() -> list[Instance]:
    """Multiple-choice requests of spread lengths: long and short questions, choices of 1 to 8 tokens."""
    filler = "the quick brown fox jumps over the lazy dog "
    questions = [f"Question: {filler * (1 + 5 * (i % 2))}what is {i} + 30?\nAnswer:" for i in range(6)]
    choices = [" (A) dog", " (B) fox jumps over", " 0 1 2 3 4 5"]
    return [Instance("loglikelihood", {}, (q, c), k) for k, q in enumerate(questions) for c in choices]


def test_auto_picks_a_size_that_runs_the_whole_evaluation_within_the_memory_it_probed(kv_heavy, monkeypatch):
    reqs = requests()
    args = f"pretrained={kv_heavy},device=cpu,dtype=float32,agents=3,latent_steps=2,attn_implementation=sdpa"
    fixed = DiffMASLM.create_from_arg_string(args + ",batch_size=6")
    with LiveBytes() as full:
        expected = fixed.loglikelihood(reqs, disable_tqdm=True)
    # the largest batch does not fit: one byte short of what the real run at 6 rows holds at its peak
    budget = full.peak - 1
    lm = DiffMASLM.create_from_arg_string(args + ",batch_size=auto,max_batch_size=6")
    monkeypatch.setattr(lm, "_probes", lambda: True)  # probe as on CUDA
    ran = []
    probe = lm._score_rows
    monkeypatch.setattr(lm, "_score_rows", lambda chunk, *a: (ran.append(len(chunk)), probe(chunk, *a))[1])
    with LiveBytes(budget):
        got = lm.loglikelihood(reqs, disable_tqdm=True)  # a fake OOM past the probe would raise here
    size = lm.batch_sizes[0]
    fitted = ran[ran.index(size) - 1] if size in ran else None  # the probe that succeeded, before the real batches
    assert ran[0] == 6 and 1 <= size < 6
    assert fitted is not None and size == max(1, int(fitted * PROBE_SHARE))
    for (a, ga), (b, gb) in zip(got, expected):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
