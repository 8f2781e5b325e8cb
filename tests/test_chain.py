"""The latent core on tiny random Llama and Qwen3 models (float32)."""

import pytest
import torch

from diffmas_eval.latent import AgentChain, LatentConfig, TraceTooLongError
from tests.conftest import QUESTIONS

ATOL = 1e-4


def chain_for(tiny, **kw):
    model, tok = tiny
    return AgentChain(model, tok, LatentConfig(**kw))


def test_zero_latent_steps_equals_one_plain_forward(tiny):
    model, _ = tiny
    chain = chain_for(tiny, latent_steps=0)
    finals = [chain.final_prompt(q) for q in QUESTIONS]
    with torch.no_grad():
        trace = chain.stage1(QUESTIONS)
        logits, ends = chain.final_logits(trace, finals)
        prompts = chain.upstream_prompts(QUESTIONS)
        for i, final in enumerate(finals):
            flat = [t for agent in prompts for t in agent[i]] + final
            ref = model(input_ids=torch.tensor([flat])).logits[0, -len(final):]
            assert (logits[i, ends[i] - len(final):ends[i]] - ref).abs().max() < ATOL
    assert trace.length > 0  # the final agent really read a trace (LatentMAS dropped it at m=0)


def test_single_agent_greedy_equals_model_generate(tiny):
    model, tok = tiny
    chain = chain_for(tiny, roles=["solver"])
    prompt = chain.final_prompt(QUESTIONS[0])
    with torch.no_grad():
        trace = chain.stage1([QUESTIONS[0]])
        assert trace.length == 0
        ours = chain.generate(trace, [prompt], max_new_tokens=20)[0].token_ids
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                             eos_token_id=-1, pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    assert ours == ref[: len(ours)] and len(ours) > 0


def assert_batched_equals_one_by_one(chain, max_new_tokens: int = 12) -> None:
    """A padded batch of QUESTIONS gives every row the trace, answer and scores it gets alone (ATOL)."""
    finals = [chain.final_prompt(q) for q in QUESTIONS]
    conts = [chain.encode(" 42"), chain.encode(" (B) dog"), chain.encode(" 5")]
    with torch.no_grad():
        batch = chain.stage1(QUESTIONS)
        gen_b = chain.generate(batch, finals, max_new_tokens=max_new_tokens)
        ll_b = chain.loglikelihood(batch, finals, conts)
        for i, q in enumerate(QUESTIONS):
            alone = chain.stage1([q])
            real = batch.mask[i].bool()
            for k_b, k_a in zip(batch.keys + batch.values, alone.keys + alone.values):
                assert (k_b[i][:, real] - k_a[0]).abs().max() < ATOL
            assert chain.generate(alone, [finals[i]], max_new_tokens=max_new_tokens)[0].token_ids == \
                gen_b[i].token_ids
            score, greedy = chain.loglikelihood(alone, [finals[i]], [conts[i]])[0]
            assert abs(score - ll_b[i][0]) < ATOL and greedy == ll_b[i][1]


def test_batched_equals_one_by_one(tiny):
    assert_batched_equals_one_by_one(chain_for(tiny, latent_steps=3))


def test_trace_length_and_memory_accounting(tiny):
    m = 4
    chain = chain_for(tiny, latent_steps=m)
    with torch.no_grad():
        trace = chain.stage1(QUESTIONS[:1])
    prompts = chain.upstream_prompts(QUESTIONS[:1])
    assert trace.length == sum(len(p[0]) + m for p in prompts)
    assert [s.agent for s in trace.segments] == ["planner", "critic", "refiner"]
    tensor_bytes = sum(t.nelement() * t.element_size() for t in trace.keys + trace.values)
    assert trace.nbytes == tensor_bytes == sum(r["bytes"] for r in trace.table())
    cfg = tiny[0].config
    assert trace.bytes_per_position() == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4


def _target(chain, question):
    prompt = chain.final_prompt(question)
    answer = chain.encode(" The answer is 42.")
    return [prompt + answer], [[-100] * len(prompt) + answer]


def test_stage1_grad_full_reaches_every_agent_and_none_cuts_it(tiny):
    ids, labels = _target(chain_for(tiny), QUESTIONS[0])
    full = chain_for(tiny, latent_steps=2, stage1_grad="full").gradient_probe(QUESTIONS[:1], ids, labels)
    none = chain_for(tiny, latent_steps=2, stage1_grad="none").gradient_probe(QUESTIONS[:1], ids, labels)
    assert [a for a, _ in full] == ["planner", "critic", "refiner"]
    assert all(g > 0 for _, g in full)
    assert all(g == 0 for _, g in none)


def test_stage1_grad_reaches_weights_through_the_trace(tiny):
    model, tok = tiny
    grads = {}
    for mode in ("full", "none"):
        chain = AgentChain(model, tok, LatentConfig(latent_steps=2, stage1_grad=mode), trainable_realign=True)
        ids, labels = _target(chain, QUESTIONS[0])
        model.zero_grad()
        chain.loss(chain.stage1(QUESTIONS[:1]), ids, labels).backward()
        # the realignment acts only in stage 1: it learns only if the gradient crosses the trace
        grads[mode] = chain.realigner.weight.grad
        grads[mode + "_q"] = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    assert grads["full"] is not None and grads["full"].abs().sum() > 0
    assert grads["none"] is None
    assert (grads["full_q"] - grads["none_q"]).abs().max() > 0
    model.zero_grad()


def test_lora_weights_get_gradient_through_stage1(tiny_llama):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_llama
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    try:
        norms = {}
        for mode in ("full", "none"):
            chain = AgentChain(peft_model, tok, LatentConfig(latent_steps=2, stage1_grad=mode))
            ids, labels = _target(chain, QUESTIONS[0])
            peft_model.zero_grad()
            chain.loss(chain.stage1(QUESTIONS[:1]), ids, labels).backward()
            norms[mode] = torch.cat([p.grad.flatten() for n, p in peft_model.named_parameters() if "lora_" in n])
        assert norms["full"].abs().sum() > 0
        assert (norms["full"] - norms["none"]).abs().max() > 1e-9  # stage 1 contributes
    finally:
        peft_model.unload().requires_grad_(True)


def test_checkpoint_agents_gives_same_loss_and_gradients(tiny_llama):
    model, tok = tiny_llama
    results = []
    for ckpt in (False, True):
        chain = AgentChain(model, tok, LatentConfig(latent_steps=2, checkpoint_agents=ckpt), trainable_realign=True)
        ids, labels = _target(chain, QUESTIONS[1])
        loss = chain.loss(chain.stage1(QUESTIONS[1:2]), ids, labels)
        loss.backward()
        results.append((loss.item(), chain.realigner.weight.grad.clone()))
    assert abs(results[0][0] - results[1][0]) < 1e-6
    assert (results[0][1] - results[1][1]).abs().max() < 1e-6


def test_checkpoint_final_gives_same_loss_and_gradients_and_holds_fewer_activations():
    """The final agent's layers recomputed in backward: the same loss and gradients (LoRA with dropout: the
    recompute must draw the forward's masks), the layers' own forwards restored after, and fewer bytes held
    for backward by the loss's forward (what autograd saves outside the checkpointed layers)."""
    from peft import LoraConfig, get_peft_model

    from diffmas_eval.testing.tiny import make_tiny_model

    base, tok = make_tiny_model("llama")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    model.train()
    results = []
    for final in (False, True):
        chain = AgentChain(model, tok, LatentConfig(latent_steps=2, checkpoint_agents=True, checkpoint_final=final))
        ids, labels = _target(chain, QUESTIONS[1])
        torch.manual_seed(3)
        trace = chain.stage1(QUESTIONS[1:3])
        held = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, held=held: held.append(t.numel() * t.element_size())
                                                      or t, lambda t: t):
            loss = chain.loss(trace, ids * 2, labels * 2)
        grads = torch.autograd.grad(loss, [p for n, p in model.named_parameters() if "lora_" in n])
        results.append((loss.item(), grads, sum(held)))
        assert all("forward" not in m.__dict__ for m in model.modules())  # the wrapped forwards are gone
    (loss0, grads0, held0), (loss1, grads1, held1) = results
    assert loss0 == loss1 and any(g.abs().sum() > 0 for g in grads0)
    for a, b in zip(grads0, grads1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert held1 < held0 / 2, (held0, held1)


def test_overwrite_keeps_only_latest_segment(tiny):
    chain = chain_for(tiny, latent_steps=2, trace="overwrite")
    with torch.no_grad():
        trace = chain.stage1(QUESTIONS[:2])
    assert [s.agent for s in trace.segments] == ["refiner"]
    assert [r["kept"] for r in trace.table()] == [False, False, True]
    assert trace.length == trace.segments[0].length
    # positions keep counting across the dropped segments
    assert trace.next_pos.tolist() == [sum(len(p[i]) + 2 for p in chain.upstream_prompts(QUESTIONS[:2]))
                                       for i in range(2)]


def test_overwrite_and_concat_differ_but_both_reach_first_agent(tiny_llama):
    ids, labels = _target(chain_for(tiny_llama), QUESTIONS[0])
    concat = dict(chain_for(tiny_llama, latent_steps=2).gradient_probe(QUESTIONS[:1], ids, labels))
    over = dict(chain_for(tiny_llama, latent_steps=2, trace="overwrite").gradient_probe(QUESTIONS[:1], ids, labels))
    assert over["planner"] > 0 and concat["planner"] > 0
    assert over["planner"] != pytest.approx(concat["planner"])


class _CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner, self.calls, self.config = model, 0, model.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, *a, **kw):
        self.calls += 1
        return self.inner(*a, **kw)


def test_too_long_trace_fails_before_compute_naming_both_numbers(tiny_llama):
    model, tok = tiny_llama
    counting = _CountingModel(model)
    chain = AgentChain(counting, tok, LatentConfig(latent_steps=5, max_trace_tokens=50))
    need = sum(len(p[0]) + 5 for p in chain.upstream_prompts(QUESTIONS[:1]))
    with pytest.raises(TraceTooLongError, match=rf"{need} positions.*max_trace_tokens=50"):
        chain.stage1(QUESTIONS[:1])
    chain = AgentChain(counting, tok, LatentConfig(latent_steps=5))
    ctx = model.config.max_position_embeddings
    with pytest.raises(TraceTooLongError, match=rf"exceed the model's context of {ctx}"):
        chain.stage1(QUESTIONS[:1], final_tokens=[10_000])
    assert counting.calls == 0


def test_bad_config_lists_valid_choices(tiny_llama):
    with pytest.raises(ValueError, match="valid roles: code, critic, math, planner, refiner, science, solver, summ"):
        chain_for(tiny_llama, roles=["planer", "solver"])
    with pytest.raises(ValueError, match="valid options: .*latent_steps"):
        LatentConfig.from_dict({"latent_step": 3})
    with pytest.raises(ValueError, match="choose one of concat, overwrite"):
        LatentConfig(trace="append")


def test_ridge_realignment_is_identity_for_tied_embeddings(tiny_llama):
    from diffmas_eval.latent.realign import Realigner

    model, _ = tiny_llama
    lm_head = model.get_output_embeddings().weight.detach()
    shared = torch.nn.Embedding.from_pretrained(lm_head)
    tied = type("Tied", (), {"get_input_embeddings": lambda s: shared,
                             "get_output_embeddings": lambda s: model.get_output_embeddings()})()
    assert torch.allclose(Realigner(tied, "ridge").weight, torch.eye(lm_head.shape[1]), atol=1e-3)
    h = torch.randn(3, lm_head.shape[1])
    out = Realigner(model, "ridge")(h)
    target = model.get_input_embeddings().weight.norm(dim=-1).mean()
    assert torch.allclose(out.norm(dim=-1), target.expand(3), rtol=1e-4)


def test_sampling_is_reproducible_with_a_seed(tiny_llama):
    chain = chain_for(tiny_llama, latent_steps=1)
    final = [chain.final_prompt(QUESTIONS[0])]
    with torch.no_grad():
        trace = chain.stage1(QUESTIONS[:1])
        runs = [chain.generate(trace, final, max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.9,
                               generator=torch.Generator().manual_seed(s))[0].token_ids for s in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_stop_strings_cut_generation(tiny_llama):
    chain = chain_for(tiny_llama, latent_steps=1)
    final = [chain.final_prompt(QUESTIONS[0])]
    with torch.no_grad():
        trace = chain.stage1(QUESTIONS[:1])
        full = chain.generate(trace, final, max_new_tokens=16)[0].text
        stop = full[3:5]
        cut = chain.generate(trace, final, max_new_tokens=16, stop=[stop])[0].text
    assert stop not in cut and full.startswith(cut)


def test_loss_and_scores_from_kept_logits_equal_the_full_computation(tiny):
    import torch.nn.functional as F

    chain = chain_for(tiny, latent_steps=2)
    prompts = [chain.final_prompt(q) for q in QUESTIONS]
    answers = [chain.encode(a) for a in (" 42", " (B) dog, because dogs bark.", " 5")]
    ids = [p + a for p, a in zip(prompts, answers)]
    labels = [[-100] * len(p) + a for p, a in zip(prompts, answers)]
    with torch.no_grad():
        trace = chain.stage1(QUESTIONS)
        full, ends = chain.final_logits(trace, ids)  # every column; rows right-padded
        width = full.shape[1]
        assert ends.tolist() == [len(r) for r in ids]
        target = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
        expected = F.cross_entropy(full[:, :-1].flatten(0, 1), target[:, 1:].flatten(), ignore_index=-100)
        assert abs(chain.loss(trace, ids, labels).item() - expected.item()) < 1e-5
        logprobs = full.log_softmax(-1)
        for i, (score, _) in enumerate(chain.loglikelihood(trace, prompts, answers)):
            n, end = len(answers[i]), len(ids[i])
            ref = logprobs[i, end - n - 1:end - 1].gather(-1, torch.tensor(answers[i])[:, None]).sum().item()
            assert abs(score - ref) < 1e-4
