"""The chain in bfloat16 (what users run on GPUs), ``latent_dtype``, and non-finite traces.

Tolerances. bf16 keeps 8 significant bits: one rounding of a value ``x`` moves it by up to
``|x| * 2**-8`` (one "ulp" here). Same-dtype comparisons (batched == alone, ``agents=1`` == the plain
model, ``m=0`` == one forward) measured exactly 0 on this CPU for every tiny architecture (its bf16
kernels accumulate in float32 and round once per op, whatever the batch); the tests allow
``BF16_SLACK`` = 4 ulps of the compared values' scale, so a kernel that reduces in a batch-dependent
order (GPUs) still passes, while a layout bug (a pad column read, a position off by one) moves the
tiny models' logits by 0.1 or more. Cross-dtype comparisons (bf16 against the float32 chain) are
bounded by what one bf16 rounding of the logits allows, and were measured well inside it.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from diffmas_eval.latent import AgentChain, LatentConfig, NonFiniteTraceError
from diffmas_eval.testing.tiny import make_tiny_model
from tests.conftest import QUESTIONS

ULP = 2 ** -8  # bf16's relative rounding step
BF16_SLACK = 4 * ULP
CONTS = [" 42", " (B) dog", " 5"]


@pytest.fixture(scope="module", params=["llama", "qwen3", "gemma3"])
def pair(request):
    """The same tiny model in float32 and in bfloat16 (cast from the same weights)."""
    model, tok = make_tiny_model(request.param)
    return model, copy.deepcopy(model).to(torch.bfloat16), tok


def _target(chain, question):
    prompt = chain.final_prompt(question)
    answer = chain.encode(" The answer is 42.")
    return [prompt + answer], [[-100] * len(prompt) + answer]


@torch.no_grad()
def test_bf16_batched_equals_each_row_alone(pair):
    _, model, tok = pair
    chain = AgentChain(model, tok, LatentConfig(latent_steps=3))
    finals = [chain.final_prompt(q) for q in QUESTIONS]
    conts = [chain.encode(c) for c in CONTS]
    batch = chain.stage1(QUESTIONS)
    assert batch.keys[0].dtype == torch.bfloat16
    gen_b = chain.generate(batch, finals, max_new_tokens=10)
    ll_b = chain.loglikelihood(batch, finals, conts)
    for i, q in enumerate(QUESTIONS):
        alone = chain.stage1([q])
        real = batch.mask[i].bool()
        for k_b, k_a in zip(batch.keys + batch.values, alone.keys + alone.values):
            scale = float(k_a.abs().max())
            assert (k_b[i][:, real].float() - k_a[0].float()).abs().max() <= BF16_SLACK * scale  # measured 0
        assert chain.generate(alone, [finals[i]], max_new_tokens=10)[0].token_ids == gen_b[i].token_ids
        score, greedy = chain.loglikelihood(alone, [finals[i]], [conts[i]])[0]
        assert abs(score - ll_b[i][0]) <= BF16_SLACK * (1 + abs(score)) and greedy == ll_b[i][1]  # measured 0


@torch.no_grad()
def test_bf16_single_agent_scores_as_the_plain_model(pair):
    """``agents=1`` is lm-eval's ``hf``: bf16 logits, log-softmax in float32 (the chain promises float32
    scores; a bf16 log-softmax would be off by ~1e-2 here, far above the measured 0)."""
    _, model, tok = pair
    chain = AgentChain(model, tok, LatentConfig(roles=["solver"]))
    contexts = [chain.final_prompt(q) for q in QUESTIONS]
    conts = [chain.encode(c) for c in CONTS]
    ours = chain.loglikelihood(chain.stage1(QUESTIONS), contexts, conts)
    for ctx, cont, (score, greedy) in zip(contexts, conts, ours):
        logits = model(input_ids=torch.tensor([ctx + cont])).logits[0, len(ctx) - 1:-1]
        assert logits.dtype == torch.bfloat16
        logp = F.log_softmax(logits.float(), -1)
        ref = float(logp.gather(-1, torch.tensor(cont)[:, None]).sum())
        assert abs(score - ref) <= BF16_SLACK * (1 + abs(ref))  # measured 0
        assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())


@torch.no_grad()
def test_bf16_zero_latent_steps_equals_one_plain_forward(pair):
    _, model, tok = pair
    chain = AgentChain(model, tok, LatentConfig(latent_steps=0))
    finals = [chain.final_prompt(q) for q in QUESTIONS]
    trace = chain.stage1(QUESTIONS)
    logits, ends = chain.final_logits(trace, finals)
    prompts = chain.upstream_prompts(QUESTIONS)
    for i, final in enumerate(finals):
        flat = [t for agent in prompts for t in agent[i]] + final
        ref = model(input_ids=torch.tensor([flat])).logits[0, -len(final):].float()
        got = logits[i, ends[i] - len(final):ends[i]].float()
        assert (got - ref).abs().max() <= BF16_SLACK * float(ref.abs().max())  # measured 0


def test_bf16_dtypes_read_back(pair):
    """What stays float32 in a bf16 chain, as the code says: the realignment (its matrix and the mapped
    vector, rounded to bf16 only when fed), the loss, and LoRA's weights and gradients (PEFT keeps
    adapters of a bf16 model in float32); the trace and the logits are the model's dtype."""
    from peft import LoraConfig, get_peft_model

    _, model, tok = pair
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    chain = AgentChain(peft_model, tok, LatentConfig(latent_steps=2))
    assert chain.realigner.weight.dtype == torch.float32 and chain.realigner.target_norm.dtype == torch.float32
    trace = chain.stage1(QUESTIONS[:2], record_inputs=True)
    assert {t.dtype for t in trace.keys + trace.values} == {torch.bfloat16}
    fed = trace.history[0].latents
    assert fed.dtype == torch.bfloat16
    # rescaled in float32 to the embeddings' mean norm, then one bf16 rounding per coordinate
    norms = fed.float().norm(dim=-1)
    assert ((norms - chain.realigner.target_norm).abs() <= 2 * ULP * chain.realigner.target_norm).all()
    ids, labels = _target(chain, QUESTIONS[0])
    logits, _ = chain.final_logits(chain.stage1(QUESTIONS[:1]), ids)
    assert logits.dtype == torch.bfloat16
    loss = chain.loss(chain.stage1(QUESTIONS[:1]), ids, labels)
    assert loss.dtype == torch.float32
    loss.backward()
    lora = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
                        for p in lora)


def _lora_step(model, tok, checkpoint: bool):
    """Loss and the flattened LoRA gradients of one step through the whole chain (LoRA set from one seed)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = (0.1 * torch.randn(p.shape, generator=gen)).to(p.dtype)
    chain = AgentChain(peft_model, tok, LatentConfig(latent_steps=2, checkpoint_agents=checkpoint))
    ids, labels = _target(chain, QUESTIONS[1])
    loss = chain.loss(chain.stage1(QUESTIONS[1:2]), ids, labels)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for n, p in peft_model.named_parameters() if "lora_" in n])


def test_bf16_lora_training_step_matches_float32_and_checkpointing(pair):
    model32, model16, tok = pair
    loss32, grad32 = _lora_step(model32, tok, checkpoint=False)
    loss16, grad16 = _lora_step(model16, tok, checkpoint=False)
    # the loss is a float32 cross-entropy over bf16 logits: one bf16 rounding of logits of size ~1 moves it
    # by at most ~ULP per token on average; measured 2.5e-4 relative (llama), 4e-4 (qwen3), 8e-5 (gemma3)
    assert abs(loss16 - loss32) <= ULP * abs(loss32)
    # gradients through 3 agents of bf16 activations: measured cosine >= 0.9999, relative error <= 0.016
    assert F.cosine_similarity(grad16, grad32, dim=0) > 0.999
    assert (grad16 - grad32).norm() <= 0.05 * grad32.norm()
    # per-agent checkpointing recomputes the same bf16 ops: measured exactly equal
    loss_ck, grad_ck = _lora_step(model16, tok, checkpoint=True)
    assert loss_ck == loss16 and torch.equal(grad_ck, grad16)


# -- latent_dtype ---------------------------------------------------------------------------------

def test_latent_dtype_is_validated_with_its_choices():
    with pytest.raises(ValueError, match="latent_dtype='bf16' is not valid; choose one of model, float32"):
        LatentConfig(latent_dtype="bf16")


@torch.no_grad()
def test_latent_dtype_float32_runs_stage1_in_float32_and_restores_the_model(pair):
    model32, model16, tok = pair
    before = {n: (t.dtype, t.clone()) for n, t in [*model16.named_parameters(), *model16.named_buffers()]}
    ref = AgentChain(model32, tok, LatentConfig(latent_steps=3)).stage1(QUESTIONS, record_inputs=True)
    half = AgentChain(model16, tok, LatentConfig(latent_steps=3)).stage1(QUESTIONS, record_inputs=True)
    up = AgentChain(model16, tok, LatentConfig(latent_steps=3, latent_dtype="float32")).stage1(
        QUESTIONS, record_inputs=True)
    # stage 2 reads a trace in the model's dtype
    assert {t.dtype for t in up.keys + up.values} == {torch.bfloat16}
    assert up.history[0].latents.dtype == torch.bfloat16
    # every weight and buffer is back, bit for bit and in its own dtype (RoPE's float32 inv_freq stays float32)
    after = dict([*model16.named_parameters(), *model16.named_buffers()])
    assert all(after[n].dtype == d and torch.equal(after[n], t) for n, (d, t) in before.items())

    def drift(trace):
        return max(float((a.latents.float() - r.latents).norm() / r.latents.norm())
                   for a, r in zip(trace.history, ref.history))

    # the float32 loop leaves only the bf16 weights' and the final cast's rounding: measured about half the
    # bf16 loop's drift from the float32 chain on every tiny architecture (llama 4.3e-3 vs 7.5e-3)
    assert drift(up) < 0.8 * drift(half)


def test_latent_dtype_float32_refuses_autograd_and_is_a_no_op_in_float32(pair):
    model32, model16, tok = pair
    chain = AgentChain(model16, tok, LatentConfig(latent_steps=1, latent_dtype="float32"))
    with pytest.raises(ValueError, match="latent_dtype=float32 .* without autograd"):
        chain.stage1(QUESTIONS[:1])
    with torch.no_grad():
        a = AgentChain(model32, tok, LatentConfig(latent_steps=2, latent_dtype="float32")).stage1(QUESTIONS[:2])
        b = AgentChain(model32, tok, LatentConfig(latent_steps=2)).stage1(QUESTIONS[:2])
    assert all(torch.equal(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values))


# -- non-finite values ----------------------------------------------------------------------------

@torch.no_grad()
def test_float16_overflow_in_the_trace_is_a_clear_error():
    model, tok = make_tiny_model("llama")
    model = model.to(torch.float16)
    model.model.layers[0].mlp.up_proj.weight.fill_(6e4)  # the MLP's inner activations overflow float16: inf, NaN
    chain = AgentChain(model, tok, LatentConfig(latent_steps=2))
    with pytest.raises(NonFiniteTraceError, match=r"planner agent wrote non-finite values .* float16.*bfloat16"):
        chain.stage1(QUESTIONS[:2])


def test_latent_dtype_reaches_the_chain_from_lm_eval_model_args(tiny_path):
    from lm_eval.api.instance import Instance

    from diffmas_eval.harness.diffmas_lm import DiffMASLM

    lm = DiffMASLM.create_from_arg_string(f"pretrained={tiny_path},dtype=bfloat16,device=cpu,agents=3,"
                                          "latent_steps=2,latent_dtype=float32")
    assert lm.chain.config.latent_dtype == "float32" and lm.model.dtype == torch.bfloat16
    score = lm.loglikelihood([Instance("loglikelihood", {}, ("Question: What is 12 + 30?\nAnswer:", " 42"), 0)],
                             disable_tqdm=True)[0][0]
    assert score < 0 and lm.model.dtype == torch.bfloat16  # ran, and the weights are back in bf16
    with pytest.raises(ValueError, match="latent_dtype='fp32' is not valid; choose one of model, float32"):
        DiffMASLM.create_from_arg_string(f"pretrained={tiny_path},device=cpu,latent_dtype=fp32")


# -- device placement -----------------------------------------------------------------------------

@torch.no_grad()
def test_a_trace_on_another_device_than_its_layer_is_a_clear_error(tiny_llama):
    """A trace lives where the layers that wrote it run; reading it after the placement changed (here:
    layer 1's cache moved to the meta device, as a changed device_map would leave it) is refused before
    any forward, naming the layer, both devices and the fix."""
    from diffmas_eval.latent.distributed import layer_devices

    model, tok = tiny_llama
    assert layer_devices(model) == {0: torch.device("cpu"), 1: torch.device("cpu")}
    chain = AgentChain(model, tok, LatentConfig(latent_steps=1))
    trace = chain.stage1(QUESTIONS[:1])
    final = [chain.final_prompt(QUESTIONS[0])]
    chain.prefill(trace, final)  # the same placement reads fine
    trace.keys[1] = trace.keys[1].to("meta")
    with pytest.raises(ValueError, match=r"trace's layer 1 is on meta but the model runs layer 1 on cpu.*one "
                                         r"device_map"):
        chain.prefill(trace, final)
    with pytest.raises(ValueError, match="trace's layer 1 is on meta"):
        chain.final_logits(trace, final)


def test_bf16_single_agent_equals_lm_eval_hf(tiny_path, local_data):
    """``--model diffmas agents=1`` against lm-eval's own ``hf``, both in bf16, through lm-eval: the same
    requests, the same greedy generations and choices picked; log-likelihoods within bf16's floor. ``hf``
    takes its log-softmax in the logits' dtype (bf16), the chain in float32, so each continuation token may
    differ by one bf16 rounding of its log-probability, ``ULP * |log p|`` per token: measured 3.1e-3 of
    ``1 + |log p|`` at worst (0.8 ULP), allowed BF16_SLACK (4 ULP)."""
    from lm_eval import simple_evaluate

    tasks = ["diffmas_arc_challenge", "diffmas_gsm8k"]
    run = {name: simple_evaluate(model=name, model_args=f"pretrained={tiny_path},{extra}dtype=bfloat16", tasks=tasks,
                                 limit=3, log_samples=True, gen_kwargs={"max_gen_toks": 12}, device="cpu",
                                 batch_size=bs)
           for name, extra, bs in (("hf", "", 1), ("diffmas", "agents=1,", 2))}
    worst = 0.0
    for task in tasks:
        pairs = zip(*(sorted(run[m]["samples"][task], key=lambda s: s["doc_id"]) for m in ("hf", "diffmas")))
        for h, d in pairs:
            assert h["arguments"] == d["arguments"]
            if isinstance(h["resps"][0][0], (list, tuple)):
                for (lh, gh), (ld, gd) in zip([r[0] for r in h["resps"]], [r[0] for r in d["resps"]]):
                    worst = max(worst, abs(lh - ld) / (1 + abs(lh)))
                    assert abs(lh - ld) <= BF16_SLACK * (1 + abs(lh)) and gh == gd
            else:
                assert h["resps"] == d["resps"]
        assert {k: v for k, v in run["hf"]["results"][task].items() if "acc" in k or "exact" in k} == \
               {k: v for k, v in run["diffmas"]["results"][task].items() if "acc" in k or "exact" in k}
    print(f"bf16 hf vs diffmas agents=1: worst relative log-likelihood difference {worst:.2e}")
