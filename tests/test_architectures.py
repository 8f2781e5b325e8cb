"""Every attention layout users bring, on tiny random models of the real transformers classes.

The core's promise: a row's numbers do not depend on what else is in the batch. Sliding-window layers
build their masks from column indices, so they would see any pad column inside a row's trace; the
trace stays left-aligned as a whole (``latent/trace.py``), which these tests hold it to.
"""

import pytest
import torch

from diffmas_eval.latent import AgentChain, LatentConfig
from diffmas_eval.testing.tiny import SLIDING_ARCHS, SLIDING_WINDOW, make_tiny_model
from tests.conftest import QUESTIONS

ATOL = 1e-4
ANSWERS = [" The answer is 42.", " (B) dog, because the dog is lazy.", " 5"]


@pytest.fixture(scope="module", params=SLIDING_ARCHS)
def sliding(request):
    return make_tiny_model(request.param)


def _setup(tiny, **kw):
    model, tok = tiny
    chain = AgentChain(model, tok, LatentConfig.from_dict({"agents": 4, "latent_steps": 3, **kw}))
    finals = [chain.final_prompt(q) for q in QUESTIONS]
    answers = [chain.encode(a) for a in ANSWERS]
    return chain, finals, answers


def _loss(chain, trace, finals, answers):
    ids = [f + a for f, a in zip(finals, answers)]
    labels = [[-100] * len(f) + a for f, a in zip(finals, answers)]
    return chain.loss(trace, ids, labels, reduction="sum")


def test_the_window_is_shorter_than_the_trace_and_really_slides(sliding):
    model, _ = sliding
    chain, finals, _ = _setup(sliding)
    with torch.no_grad():
        trace = chain.stage1(QUESTIONS[:1])
    assert trace.length > 4 * SLIDING_WINDOW
    # the same weights without the window give other logits: the window is in force
    model.config.sliding_window, saved = 10**6, model.config.sliding_window
    try:
        with torch.no_grad():
            wide, _ = chain.final_logits(trace, finals[:1], 1)
    finally:
        model.config.sliding_window = saved
    with torch.no_grad():
        narrow, _ = chain.final_logits(trace, finals[:1], 1)
    assert (wide - narrow).abs().max() > 1e-3


@pytest.mark.parametrize("trace_mode", ["concat", "overwrite"])
def test_batched_equals_one_by_one_with_sliding_windows(sliding, trace_mode):
    chain, finals, answers = _setup(sliding, trace=trace_mode)
    with torch.no_grad():
        batch = chain.stage1(QUESTIONS)
        assert len(set(batch.mask.sum(-1).tolist())) == len(QUESTIONS)  # rows of different lengths: padding
        gen_b = chain.generate(batch, finals, max_new_tokens=8)
        ll_b = chain.loglikelihood(batch, finals, answers)
        loss_b = [_loss(chain, batch.select([i]), finals[i:i + 1], answers[i:i + 1]).item()
                  for i in range(len(QUESTIONS))]
        for i, q in enumerate(QUESTIONS):
            alone = chain.stage1([q])
            real = batch.mask[i].bool()
            assert int(real.sum()) == alone.length
            for k_b, k_a in zip(batch.keys + batch.values, alone.keys + alone.values):
                assert (k_b[i][:, real] - k_a[0]).abs().max() < ATOL
            assert chain.generate(alone, [finals[i]], max_new_tokens=8)[0].token_ids == gen_b[i].token_ids
            score, greedy = chain.loglikelihood(alone, [finals[i]], [answers[i]])[0]
            assert abs(score - ll_b[i][0]) < ATOL and greedy == ll_b[i][1]
            assert abs(_loss(chain, alone, finals[i:i + 1], answers[i:i + 1]).item() - loss_b[i]) < ATOL


def test_training_loss_and_gradients_batched_equal_one_by_one(sliding):
    model, tok = sliding
    chain = AgentChain(model, tok, LatentConfig.from_dict({"agents": 3, "latent_steps": 2}), trainable_realign=True)
    finals = [chain.final_prompt(q) for q in QUESTIONS]
    answers = [chain.encode(a) for a in ANSWERS]
    chain.realigner.weight.grad = None
    batched = _loss(chain, chain.stage1(QUESTIONS), finals, answers)
    batched.backward()
    grad_b = chain.realigner.weight.grad.clone()
    chain.realigner.weight.grad = None
    alone = sum(_loss(chain, chain.stage1([q]), [f], [a]) for q, f, a in zip(QUESTIONS, finals, answers))
    alone.backward()
    assert abs(batched.item() - alone.item()) < ATOL * len(QUESTIONS)
    assert (grad_b - chain.realigner.weight.grad).abs().max() < 1e-4 * max(1.0, grad_b.abs().max().item())
    model.zero_grad()


def test_gradient_probe_reaches_every_agent(sliding):
    chain, finals, answers = _setup(sliding, latent_steps=2)
    ids = [finals[0] + answers[0]]
    labels = [[-100] * len(finals[0]) + answers[0]]
    norms = chain.gradient_probe(QUESTIONS[:1], ids, labels)
    assert [a for a, _ in norms] == ["planner", "critic", "refiner"]
    if "full_attention" in (getattr(chain.model.config, "layer_types", None) or []):
        assert all(g > 0 for _, g in norms)
    else:  # every layer slides: 2 layers x 24 columns cannot reach past the final agent's own prompt
        assert all(g == 0 for _, g in norms)


def test_lm_eval_scores_a_sliding_window_model_the_same_at_any_batch_size(tmp_path, local_data):
    from lm_eval import simple_evaluate

    from diffmas_eval.testing.tiny import save_tiny_model

    path = save_tiny_model(tmp_path / "gemma3", "gemma3")
    runs = [simple_evaluate(model="diffmas", model_args=f"pretrained={path},agents=3,latent_steps=2,dtype=float32",
                            tasks=["diffmas_arc_challenge", "diffmas_gsm8k"], limit=3, batch_size=bs,
                            log_samples=True, gen_kwargs={"max_gen_toks": 8}, device="cpu") for bs in (1, 3)]
    for task in ("diffmas_arc_challenge", "diffmas_gsm8k"):
        one, three = (sorted(r["samples"][task], key=lambda s: s["doc_id"]) for r in runs)
        for a, b in zip(one, three, strict=True):
            if task == "diffmas_gsm8k":
                assert a["resps"] == b["resps"]
            else:
                for (la, ga), (lb, gb) in zip([r[0] for r in a["resps"]], [r[0] for r in b["resps"]]):
                    assert abs(la - lb) < ATOL and ga == gb


# -- latent vectors at the norm the model feeds itself (scaled input embeddings) --------------------
def _first_layer_norms(model, chain, question):
    """Mean input norm at the first decoder layer: prompt columns (prefills) vs latent columns (1 wide)."""
    seen = {"prompt": [], "latent": []}

    def hook(module, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        seen["latent" if h.shape[1] == 1 else "prompt"].append(h[0].norm(dim=-1))

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            chain.stage1([question])
    finally:
        handle.remove()
    return (float(torch.cat(seen["prompt"]).mean()), float(torch.cat(seen["latent"]).mean()))


def _reference_realign(model, lam=1e-5):
    """The LatentMAS ridge map and norm target on the embedding weight rows (the numbers before targets)."""
    w_in = model.get_input_embeddings().weight.detach().float()
    w_out = model.get_output_embeddings().weight.detach().float()
    gram = w_out.T @ w_out + lam * torch.eye(w_in.shape[1])
    return torch.linalg.solve(gram, w_out.T @ w_in), w_in.norm(dim=-1).mean()


def test_gemma_latent_vectors_reach_the_first_layer_at_a_token_norm():
    model, tok = make_tiny_model("gemma3")
    chain = AgentChain(model, tok, LatentConfig.from_dict({"agents": 2, "latent_steps": 2}))
    assert chain.realigner.input_scale == pytest.approx(model.config.hidden_size ** 0.5)
    prompt, latent = _first_layer_norms(model, chain, QUESTIONS[0])
    assert 1 / 1.5 < latent / prompt < 1.5
    legacy = AgentChain(model, tok, LatentConfig.from_dict({"agents": 2, "latent_steps": 2,
                                                            "realign_target": "weight_rows"}))
    prompt, latent = _first_layer_norms(model, legacy, QUESTIONS[0])
    assert latent / prompt < 0.2  # what the weight rows gave: 1/sqrt(hidden) of a token


def test_gemma_without_its_scale_gives_the_weight_row_numbers():
    model, tok = make_tiny_model("gemma3")
    model.model.embed_tokens.embed_scale.fill_(1.0)
    chain = AgentChain(model, tok, LatentConfig.from_dict({"agents": 2, "latent_steps": 2}))
    w_a, norm = _reference_realign(model)
    assert chain.realigner.input_scale == 1.0
    assert torch.equal(chain.realigner.weight, w_a) and torch.equal(chain.realigner.target_norm, norm)


def test_llama_and_qwen3_realignment_unchanged_bit_for_bit(tiny):
    model, tok = tiny
    chain = AgentChain(model, tok, LatentConfig.from_dict({"agents": 2, "latent_steps": 2}))
    w_a, norm = _reference_realign(model)
    assert torch.equal(chain.realigner.weight, w_a) and torch.equal(chain.realigner.target_norm, norm)
    h = torch.randn(3, w_a.shape[0], generator=torch.Generator().manual_seed(0))
    mapped = h @ w_a
    assert torch.equal(chain.realigner(h), mapped * (norm / mapped.norm(dim=-1, keepdim=True).clamp(min=1e-6)))


def test_a_chain_saved_before_realign_targets_keeps_its_meaning(tmp_path):
    import json

    from diffmas_eval.latent.persist import load_chain_config

    (tmp_path / "diffmas.json").write_text(json.dumps({"roles": ["planner", "solver"], "latent_steps": 2,
                                                       "realign": "ridge", "trace": "concat"}))
    saved, _ = load_chain_config(tmp_path)
    assert saved["realign_target"] == "weight_rows"
    model, tok = make_tiny_model("gemma3")
    chain = AgentChain(model, tok, LatentConfig(**saved))
    assert torch.equal(chain.realigner.target_norm, _reference_realign(model)[1])


def test_an_embedding_that_does_more_than_scale_is_refused():
    from diffmas_eval.latent.realign import embedding_scale

    class Shifted(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1.0

    with pytest.raises(ValueError, match="does more than scale"):
        embedding_scale(Shifted(50, 8))
