"""The LM head runs only where its logits are read: not in stage 1, and on one column per row in a prefill.

Stage 1 reads hidden states only, so its prompt prefills and latent steps call the decoder alone; a prefill of a
padded batch reads each row's last token, so the head gets ``[B, 1, hidden]``, not the ``[B, cols, hidden]`` of
``logits_to_keep=cols``. Hooks on the head count its calls and record its input shapes.
"""

from __future__ import annotations

import pytest
import torch

from diffmas_eval.latent.chain import AgentChain, _at_last_token
from diffmas_eval.latent.config import LatentConfig
from diffmas_eval.testing.tiny import make_tiny_model

QUESTIONS = ["What is 2 + 3?", "Name a prime number greater than ten, please.", "Why?"]


def _head_inputs(model) -> tuple[list[tuple[int, ...]], object]:
    shapes: list[tuple[int, ...]] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: shapes.append(args[0].shape))
    return shapes, handle


@pytest.mark.parametrize("latent_dtype", ["model", "float32"])
@torch.no_grad()
def test_stage1_never_calls_the_lm_head(latent_dtype):
    model, tok = make_tiny_model("qwen3")
    if latent_dtype == "float32":
        model = model.to(torch.bfloat16)  # latent_dtype=float32 upcasts a half model: the head's copy went with it
    chain = AgentChain(model, tok, LatentConfig(latent_steps=3, latent_dtype=latent_dtype))
    shapes, handle = _head_inputs(model)
    trace = chain.stage1(QUESTIONS)
    assert shapes == []  # 3 agents x (1 prompt prefill + 3 latent steps) decoder calls, no head call
    chain.prefill(trace, [chain.final_prompt(q) for q in QUESTIONS])
    handle.remove()
    assert len(shapes) == 1  # stage 2 reads logits: the head runs there


@pytest.mark.parametrize("arch", ["qwen3", "gemma2"])
@torch.no_grad()
def test_a_prefill_gives_the_head_one_column_per_row_and_the_logits_of_all_columns(arch):
    """Gemma 2 soft-caps its logits after the head: still applied. Tolerance: the head's matmul on one row per
    batch item against all ``cols`` rows then gathered; measured 0.0 (bit-equal) on these models and 2 threads;
    1e-6 leaves room for a BLAS that blocks the two shapes differently."""
    model, tok = make_tiny_model(arch)
    chain = AgentChain(model, tok, LatentConfig(latent_steps=2))
    trace = chain.stage1(QUESTIONS)
    rows = [chain.final_prompt(q) for q in QUESTIONS]
    assert len({len(r) for r in rows}) > 1  # a padded batch: cols > 1
    shapes, handle = _head_inputs(model)
    _, logits = chain.prefill(trace, rows)
    handle.remove()
    assert shapes == [torch.Size([len(rows), 1, model.config.hidden_size])]

    # the read before: logits for every column from the shortest row's last token on, one column taken per row
    work = trace.fork()
    cache = work.cache()
    ids, mask = chain._right_pad(rows)
    cols = mask.shape[1] - int(mask.sum(-1).min()) + 1
    out = model(input_ids=ids, attention_mask=work.full_mask(mask), position_ids=work.positions(mask), cache=cache,
                use_cache=True, logits_to_keep=cols)
    assert out.logits.shape[1] == cols > 1
    torch.testing.assert_close(logits, _at_last_token(out.logits, mask), rtol=0, atol=1e-6)
