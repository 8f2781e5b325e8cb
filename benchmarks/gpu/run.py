# ruff: noqa: B023  (every closure below is timed at once, inside its loop iteration)
"""The prepared device check: DiffMAS on real model shapes (random init), bf16, one GPU.

    python benchmarks/gpu/run.py --out gpu_results                      # one H100/H200: Qwen3-8B shapes, bf16
    python benchmarks/gpu/run.py --device cpu --tiny --out cpu_results   # a rehearsal on any CPU, tiny shapes
    python benchmarks/gpu/run.py --sections long_decode --long-tokens 8192 --out gpu_results_8k  # the 8k decode

**One call, pass or fail.** The whole check fits one device call: ``--budget-s`` (300 on a GPU, none on a CPU)
is the wall time it may take after the model is built. A section whose estimate (``ESTIMATE_S``) does not fit what
is left is not started, and one still running when the budget ends is stopped (an alarm); both are recorded as
``{"skipped": "<why>"}`` under the section's own name, so a rerun with ``--sections`` can pick them up. The exit
status is non-zero when a section raised or a target it records is missed (``judge``: ``loss_fell``,
``same_generations``, and on a GPU the decode ratios); ``targets`` in the JSON lists each with its value.

Speed and memory do not depend on the weights, so the models are random-initialised from published
config values (``SHAPES``: Qwen3-0.6B/1.7B/8B; no download, no network). Imports only torch,
transformers, peft, accelerate and this package (``lm_eval`` only if present, for the real
``--batch_size auto`` class). Each section runs on its own (a failure is recorded, the rest goes on)
and the results go to ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``:

1. ``speed``: stage 1 and stage 2 (4 agents, 10 latent steps, 64 new tokens) against HF ``generate`` of
   the final prompt alone, at batch 1, 8, 32.
2. ``steps``: a latent step against a decode step (the same forward shape: one new column per row).
3. ``memory``: the trace's bytes at about 4k and 32k positions, and the CUDA peak, against
   ``diffmas-eval memory``'s prediction (``trace_memory`` from the config).
4. ``auto_batch``: ``--batch_size auto``'s probe (the real chain from ``max_batch_size`` down until
   nothing runs out of memory) and ``RowCost``'s estimate of one row.
5. ``batched_vs_alone``: 3 rows of different lengths batched vs each alone, in bf16 on this device.
6. ``training``: one LoRA step through the chain with and without per-agent checkpointing: time, peak.
7. ``attention``: sdpa against eager on the trace's mask: the same numbers, and the time.
8. ``stage1_peak``: stage 1's CUDA peak above the weights against ``RowCost``'s estimate, ``latent_dtype``
   model and float32 (cast module by module).
9. ``long_decode``: the chain's decode loop against HF ``generate`` at ``--long-tokens`` new tokens (batch 1; 1k
   by default, one timed run each after a short warm-up; the 8k decode is its own call, ``--long-tokens 8192``).
10. ``split``: half the layers on ``cuda:0``, half on ``cpu`` (accelerate hooks, as a ``device_map``), scored
    and generated, against the unsplit model (qwen3-0.6b shapes made untied, as Qwen3-8B and larger are, float32;
    a tied head would stay with the embedding).
11. ``qlora``: one QLoRA step (NF4 via bitsandbytes, k-bit preparation, LoRA r 8) through the chain at the
    main shape; needs ``bitsandbytes`` (``pip install 'diffmas-eval[quant]'``), else the section records why.

The QLoRA section runs last: it builds a second model (a quantized copy) after the others freed theirs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the working tree's package, not an installed one

from diffmas_eval.harness.batching import RowCost  # noqa: E402
from diffmas_eval.latent import AgentChain, LatentConfig  # noqa: E402
from diffmas_eval.memory import trace_memory  # noqa: E402
from diffmas_eval.testing.tiny import make_tokenizer  # noqa: E402

# published config values (config.json on the hub) of the shapes users run; vocab 151,936 everywhere
SHAPES = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    # --tiny: the same class and layout, small enough for a CPU rehearsal
    "qwen3-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
}
COMMON = dict(vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6)
WORDS = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
         "How many clips did Natalia sell altogether in April and May? ").split()


_TOKENS_PER_WORD: list[float] = []


def question(tokens: int, shift: int = 0) -> str:
    """A question of about ``tokens`` tokens of the tokenizer in use (the words repeat; only the length
    matters for speed and memory)."""
    if not _TOKENS_PER_WORD:
        sample = " ".join(WORDS * 20)
        _TOKENS_PER_WORD.append(len(make_tokenizer()(sample)["input_ids"]) / (20 * len(WORDS)))
    words = max(1, round(tokens / _TOKENS_PER_WORD[0]))
    return " ".join(WORDS[(i + shift) % len(WORDS)] for i in range(words))


def sft_rows(chain, batch: int) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """``batch`` questions and their SFT rows (final prompt + a fixed answer; loss on the answer only)."""
    qs = [question(120, i) for i in range(batch)]
    ids, labels = [], []
    for q in qs:
        prompt, answer = chain.final_prompt(q), chain.encode(" The answer is 72, because 48 + 24 = 72.") * 4
        ids.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    return qs, ids, labels


class Env:
    def __init__(self, device: str, tiny: bool):
        self.device = torch.device(device)
        self.tiny = tiny
        self.tok = make_tokenizer()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn, repeats: int = 1, warmup: bool = True):
        """Median seconds of ``repeats`` runs after one warm-up (unless ``warmup`` is False), and the last result."""
        out = fn() if warmup else None
        times = []
        for _ in range(repeats):
            self.sync()
            t0 = time.perf_counter()
            out = fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2], out

    def peak_reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated() if self.device.type == "cuda" else None

    def model(self, shape: str, dtype: torch.dtype, attn: str = "sdpa", **overrides):
        from transformers import AutoModelForCausalLM, Qwen3Config

        config = Qwen3Config(**COMMON, **{**SHAPES[shape], **overrides}, pad_token_id=self.tok.pad_token_id,
                             eos_token_id=self.tok.eos_token_id, bos_token_id=None)
        torch.manual_seed(0)
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
        if not self.tiny:  # random init of 8B weights in bf16 can overflow activations: keep them small
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() >= 2:
                        p.normal_(0.0, 0.02)
        model.generation_config.pad_token_id = self.tok.pad_token_id
        return model.eval(), config


def chain_of(env: Env, model, agents: int = 4, m: int = 10, **kw) -> AgentChain:
    return AgentChain(model, env.tok, LatentConfig.from_dict({"agents": agents, "latent_steps": m, **kw}))


@torch.no_grad()
def speed(env: Env, model, batches: list[int], new_tokens: int) -> list[dict]:
    rows = []
    for b in batches:
        qs = [question(120, i) for i in range(b)]
        chain = chain_of(env, model)
        finals = [chain.final_prompt(q) for q in qs]
        s1, trace = env.timed(lambda: chain.stage1(qs))
        s2, _ = env.timed(lambda: chain.generate(trace, finals, max_new_tokens=new_tokens, ignore_eos=True))
        width = max(map(len, finals))
        ids = torch.tensor([[env.tok.pad_token_id] * (width - len(f)) + f for f in finals], device=env.device)
        attn = (ids != env.tok.pad_token_id).long()
        hf, _ = env.timed(lambda: model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=new_tokens,
                                                 min_new_tokens=new_tokens, do_sample=False,
                                                 pad_token_id=env.tok.pad_token_id))
        rows.append({"batch": b, "trace_positions": trace.length, "stage1_s": s1, "stage2_s": s2, "hf_generate_s": hf,
                     "stage2_over_hf": s2 / hf, "new_tokens": new_tokens})
    for r in rows:  # DiffMAS's batch speedup (s/question at batch 1 over at this batch) as a share of generate's
        one = rows[0]
        diffmas = (one["stage1_s"] + one["stage2_s"]) / ((r["stage1_s"] + r["stage2_s"]) / r["batch"] * one["batch"])
        r["diffmas_speedup_share"] = diffmas / (one["hf_generate_s"] / (r["hf_generate_s"] / r["batch"] * one["batch"]))
    return rows


@torch.no_grad()
def steps(env: Env, model, batch: int, new_tokens: int) -> dict:
    """Per-step cost from differences, so prompt prefills cancel: stage 1 at m=10 minus m=0 over the 3 x 10
    latent steps; HF generate of ``new_tokens`` minus 1 token over ``new_tokens - 1`` decode steps."""
    qs = [question(120, i) for i in range(batch)]
    t0, _ = env.timed(lambda: chain_of(env, model, m=0).stage1(qs), 2)
    t10, _ = env.timed(lambda: chain_of(env, model, m=10).stage1(qs), 2)
    chain = chain_of(env, model)
    ids = torch.tensor([chain.final_prompt(qs[0])] * batch, device=env.device)

    def gen(n):
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=env.tok.pad_token_id)

    g1, _ = env.timed(lambda: gen(1), 2)
    gn, _ = env.timed(lambda: gen(new_tokens), 2)
    latent, decode = (t10 - t0) / 30, (gn - g1) / (new_tokens - 1)
    return {"batch": batch, "latent_step_s": latent, "decode_step_s": decode, "latent_over_decode": latent / decode}


@torch.no_grad()
def memory(env: Env, model, config, shape: str, targets: list[int]) -> list[dict]:
    rows = []
    for target in targets:
        per_agent = target // 3 - 10 - 40  # 3 upstream agents x (role prompt ~40 + question + 10 latent)
        chain = chain_of(env, model)
        env.peak_reset()
        base = torch.cuda.memory_allocated() if env.device.type == "cuda" else None
        trace = chain.stage1([question(per_agent)])
        prompts = [len(p[0]) for p in chain.upstream_prompts([question(per_agent)])]
        pred = trace_memory(shape, agents=4, latent_steps=10, prompt_tokens=prompts, config=config,
                            dtype=str(next(model.parameters()).dtype).replace("torch.", ""))
        rows.append({"target_positions": target, "positions": trace.length, "trace_bytes": trace.nbytes,
                     "predicted_bytes": pred.trace_bytes, "predicted_positions": pred.trace_positions,
                     "equal": trace.nbytes == pred.trace_bytes,
                     "cuda_peak_over_weights_bytes": (env.peak() - base) if base is not None else None})
        del trace
    return rows


def auto_batch(env: Env, model, max_batch: int, final: int) -> dict:
    """The probe of ``DiffMASLM._probe`` (same calls: stage 1 then the final agent's scoring forward, from
    ``max_batch`` down on OOM) and ``RowCost``'s one-row estimate; the real lm-eval class too if installed."""
    from accelerate.utils import find_executable_batch_size

    q = question(200)
    chain = chain_of(env, model)
    prompts = [len(a[0]) for a in chain.upstream_prompts([q])]
    trace = sum(prompts) + 10 * len(prompts)
    est = RowCost.of(model).row(trace, final, prefill=max([final, *prompts]), scored=final // 2)
    ctx, cont = [env.tok.eos_token_id] * (final - final // 2), [env.tok.eos_token_id] * (final // 2)
    tried = []

    @find_executable_batch_size(starting_batch_size=max_batch)
    def run(batch_size: int) -> int:
        tried.append(batch_size)
        with torch.no_grad():
            t = chain.stage1([q] * batch_size, final_tokens=[final] * batch_size)
            chain.loglikelihood(t, [ctx] * batch_size, [cont] * batch_size)
        return batch_size

    env.peak_reset()
    t0 = time.perf_counter()
    try:
        size = run()
    except RuntimeError as err:
        size = f"none fits: {err}"
    out = {"probed_batch_size": size, "tried": tried, "probe_s": time.perf_counter() - t0,
           "row_estimate_bytes": est, "peak_bytes": env.peak(), "trace_positions": trace, "final_positions": final}
    if env.device.type == "cuda":
        out["free_bytes_after"] = torch.cuda.mem_get_info()[0]
    try:
        import lm_eval  # noqa: F401
        out["lm_eval"] = "installed (use lm_eval --model diffmas --batch_size auto for the class's own probe)"
    except ImportError:
        out["lm_eval"] = "not installed here: the probe above makes the same calls as DiffMASLM._probe"
    return out


@torch.no_grad()
def batched_vs_alone(env: Env, model) -> dict:
    qs = [question(40), question(120, 3), question(80, 7)]
    chain = chain_of(env, model, m=4)
    finals = [chain.final_prompt(q) for q in qs]
    batch = chain.stage1(qs)
    _, first_b = chain.prefill(batch, finals)
    kv, logit, same = 0.0, 0.0, 0
    for i, q in enumerate(qs):
        alone = chain.stage1([q])
        real = batch.mask[i].bool()
        for kb, ka in zip(batch.keys + batch.values, alone.keys + alone.values):
            kv = max(kv, float((kb[i][:, real].float() - ka[0].float()).abs().max() / ka.float().abs().max()))
        _, first_a = chain.prefill(alone, [finals[i]])
        logit = max(logit, float((first_b[i].float() - first_a[0].float()).abs().max()))
        same += int(first_b[i].argmax() == first_a[0].argmax())
    return {"rows": len(qs), "kv_max_rel_diff": kv, "first_token_logit_max_abs_diff": logit,
            "same_greedy_token": same, "dtype": str(batch.keys[0].dtype)}


def training(env: Env, model, batch: int) -> list[dict]:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    rows = []
    try:
        for ckpt in (False, True):
            chain = chain_of(env, peft_model, checkpoint_agents=ckpt)
            qs, ids, labels = sft_rows(chain, batch)

            def step():
                peft_model.zero_grad(set_to_none=True)
                loss = chain.loss(chain.stage1(qs), ids, labels)
                loss.backward()
                return float(loss.detach())

            step()  # warm-up
            env.peak_reset()
            seconds, loss = env.timed(step, 1)
            rows.append({"checkpoint_agents": ckpt, "batch": batch, "step_s": seconds, "loss": loss,
                         "peak_bytes": env.peak()})
    finally:
        peft_model.unload()
    model.eval()
    return rows


@torch.no_grad()
def attention(env: Env, model) -> dict:
    qs = [question(40), question(120, 3)]
    out = {}
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        chain = chain_of(env, model, m=4)
        seconds, trace = env.timed(lambda: chain.stage1(qs, record_inputs=True))
        _, first = chain.prefill(trace, [chain.final_prompt(q) for q in qs])
        out[impl] = {"stage1_s": seconds, "first": first.float(), "latents": [s.latents.float() for s in trace.history]}
    model.set_attn_implementation("sdpa")
    rel = max(float((a - b).norm() / b.norm()) for a, b in zip(out["sdpa"]["latents"], out["eager"]["latents"]))
    return {"sdpa_stage1_s": out["sdpa"]["stage1_s"], "eager_stage1_s": out["eager"]["stage1_s"],
            "latent_rel_diff": rel,
            "first_token_logit_max_abs_diff": float((out["sdpa"]["first"] - out["eager"]["first"]).abs().max()),
            "same_greedy_token": int((out["sdpa"]["first"].argmax(-1) == out["eager"]["first"].argmax(-1)).sum())}


def quantize_4bit(model, compute_dtype: torch.dtype):
    """The decoder's linear layers as bitsandbytes NF4 ``Linear4bit`` in place (what ``from_pretrained`` with
    ``BitsAndBytesConfig(load_in_4bit=True)`` builds; here without writing 16 GB of random weights to disk).
    ``lm_head`` stays as it is, as transformers leaves it."""
    import bitsandbytes as bnb

    device = next(model.parameters()).device
    for layer in model.model.layers:
        for child in list(layer.modules()):
            for attr, linear in list(child.named_children()):
                if isinstance(linear, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                          compute_dtype=compute_dtype, quant_type="nf4", device="cpu")
                    q.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu", torch.float32).contiguous(),
                                                 requires_grad=False, quant_type="nf4")
                    setattr(child, attr, q.to(device))
    model.is_loaded_in_4bit = True
    return model


def qlora(env: Env, shape: str, dtype: torch.dtype, batch: int) -> dict:
    """One QLoRA step through the chain (4 agents, 10 latent steps, stage1_grad=full, per-agent checkpointing):
    NF4 weights, k-bit preparation as ``diffmas_eval.training.sft`` does it, LoRA r 8 on q/v: time, CUDA peak,
    and that the loss falls over a few steps on one batch."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from diffmas_eval.models import require_bitsandbytes

    require_bitsandbytes(env.device)
    model, _ = env.model(shape, dtype)
    env.peak_reset()
    model = quantize_4bit(model, dtype)
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated() if env.device.type == "cuda" else None
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    chain = chain_of(env, peft_model, checkpoint_agents=True)
    qs, ids, labels = sft_rows(chain, batch)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = chain.loss(chain.stage1(qs), ids, labels)
        loss.backward()
        opt.step()
        return float(loss.detach())

    first = step()
    env.peak_reset()
    seconds, _ = env.timed(step, 1)
    losses = [step() for _ in range(3)]
    out = {"shape": shape, "batch": batch, "quant": "nf4", "step_s": seconds, "loss_first": first,
           "loss_last": losses[-1], "loss_fell": losses[-1] < first, "peak_bytes": env.peak(),
           "weights_bytes_4bit": weights}
    return out  # the quantized model and its optimizer go with this frame


def split_layers(model, first: torch.device, second: torch.device) -> None:
    """Half the decoder layers (and the final norm and LM head) run on ``second``, the rest on ``first``, through
    accelerate's hooks as a ``device_map`` places them: each layer's cache lives on its own device."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    layers = model.model.layers
    half = len(layers) // 2
    # a tied LM head is the embedding's weight: moving it would move the embedding too, while the embedding's
    # hook sends ids to ``first``; keep it with the embedding (accelerate's device_map does the same)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    moved = [*layers[half:], model.model.norm, *([] if tied else [model.lm_head])]
    for module in moved:
        module.to(second)
        add_hook_to_module(module, AlignDevicesHook(execution_device=second, io_same_device=False))
    for module in [model.model.embed_tokens, *layers[:half], *([model.lm_head] if tied else [])]:
        add_hook_to_module(module, AlignDevicesHook(execution_device=first, io_same_device=False))


@torch.no_grad()
def split(env: Env, shape: str, new_tokens: int) -> dict:
    """A real split: half the layers on ``cuda:0``, half on ``cpu`` (on a CPU rehearsal both are the CPU, the
    hooks still run), scored and generated, against the same model on one device. float32, so the two devices'
    kernels are the only difference."""
    from diffmas_eval.latent.distributed import layer_devices

    model, _ = env.model(shape, torch.float32, tie_word_embeddings=False)  # untied, as Qwen3-8B and larger
    qs = [question(60), question(100, 3)]
    chain = chain_of(env, model, m=4)
    finals = [chain.final_prompt(q) for q in qs]
    cont = [chain.encode(" The answer is 72.")] * len(qs)
    trace = chain.stage1(qs)
    ref_scores = chain.loglikelihood(trace, finals, cont)
    ref_gen = chain.generate(trace, finals, max_new_tokens=new_tokens, ignore_eos=True)
    split_layers(model, env.device, torch.device("cpu"))
    chain = chain_of(env, model, m=4)
    trace = chain.stage1(qs)
    devices = sorted({str(k.device) for k in trace.keys})
    scores = chain.loglikelihood(trace, finals, cont)
    picked = trace.select([1, 0, 1])  # the scoring path's row selection, over both devices
    gen = chain.generate(trace, finals, max_new_tokens=new_tokens, ignore_eos=True)
    same = sum(a.token_ids == b.token_ids for a, b in zip(gen, ref_gen))
    diff = max(abs(a[0] - b[0]) for a, b in zip(scores, ref_scores))
    return {"shape": shape, "tied": model.lm_head.weight is model.model.embed_tokens.weight, "trace_devices": devices,
            "layer_devices": sorted({str(d) for d in layer_devices(model).values()}), "select_rows": picked.batch,
            "score_max_abs_diff": diff, "same_generations": f"{same}/{len(gen)}", "new_tokens": new_tokens}


@torch.no_grad()
def long_decode(env: Env, model, new_tokens: int) -> dict:
    """The chain's decode loop (agents=1, empty trace) against HF ``generate`` at ``new_tokens`` new tokens,
    batch 1, EOS ignored: equal ratios at every length mean no per-token host cost growing with the answer. Both
    warm up once at the short length; each length is then one timed run of each (an 8k decode of an 8B model
    is minutes: repeats would not fit one call)."""
    chain = chain_of(env, model, agents=1, m=0)
    prompt = chain.final_prompt(question(120))
    ids = torch.tensor([prompt], device=env.device)
    trace = chain.stage1([question(120)])

    def ours(n: int):
        return chain.generate(trace, [prompt], max_new_tokens=n, ignore_eos=True)

    def theirs(n: int):
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=env.tok.pad_token_id)

    short = max(16, new_tokens // 8)
    ours(short), theirs(short)  # warm-up
    rows = {}
    for n in sorted({short, new_tokens}):
        c, _ = env.timed(lambda: ours(n), warmup=False)
        g, _ = env.timed(lambda: theirs(n), warmup=False)
        rows[n] = (c, g)
    return {f"chain_over_generate_{n}": c / g for n, (c, g) in rows.items()} | {
        f"generate_s_{n}": g for n, (c, g) in rows.items()}


@torch.no_grad()
def stage1_peak(env: Env, model, batch: int) -> list[dict]:
    """Stage 1's CUDA peak above the weights (4 agents, 10 latent steps) against ``RowCost``'s estimate of its
    rows, in the model's dtype and with ``latent_dtype=float32`` (cast module by module)."""
    rows = []
    qs = [question(500, i) for i in range(batch)]
    for latent_dtype in ("model", "float32"):
        chain = chain_of(env, model, latent_dtype=latent_dtype)
        prompts = [len(a[0]) for a in chain.upstream_prompts(qs[:1])]
        trace_positions = sum(prompts) + 10 * len(prompts)
        estimate = RowCost.of(model).row(trace_positions, 0, prefill=max(prompts), scored=1) * batch
        env.peak_reset()
        base = torch.cuda.memory_allocated() if env.device.type == "cuda" else None
        trace = chain.stage1(qs)
        rows.append({"latent_dtype": latent_dtype, "batch": batch, "trace_positions": trace.length,
                     "trace_bytes": trace.nbytes, "row_estimate_x_batch": estimate,
                     "peak_above_weights": (env.peak() - base) if base is not None else None})
        del trace
    return rows


def markdown(results: dict) -> str:
    lines = [f"# DiffMAS device check ({results['device_name']}, {results['shape']}, {results['dtype']})", "",
             f"torch {results['torch']}, transformers {results['transformers']}, peft {results['peft']}; "
             f"random-init weights; {results['when']}", ""]
    if "targets" in results:
        lines += [f"**{'PASS' if results['passed'] else 'FAIL'}** (budget {results['budget_s']} s, "
                  f"{results['total_s']:.0f} s in all)", "", "| target | value | wanted | met |", "|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['value']} | {t['wanted']} | "
                  f"{('yes' if t['met'] else 'NO') if t['judged'] else 'not judged (tiny rehearsal)'} |"
                  for t in results["targets"]]
        lines.append("")
    for name, value in results["sections"].items():
        lines.append(f"## {name}")
        if isinstance(value, dict) and "error" in value:
            lines += ["", "```", value["error"].strip()[-1500:], "```", ""]
            continue
        if isinstance(value, dict) and "skipped" in value:
            lines += ["", f"skipped: {value['skipped']}", ""]
            continue
        rows = value if isinstance(value, list) else [value]
        keys = list(rows[0])
        lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in rows:
            cells = (f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# rough seconds per section: (Qwen3-8B shapes on one H100/H200, bf16, default sizes; tiny shapes on a 2-core CPU).
# The GPU column is a guess until a GPU has run the check (the alarm is the real guard); long_decode's scales with
# --long-tokens (given for 1024)
# (the tiny column: this 2-core machine when quiet; under a load of 3 to 4 it ran 3-5x longer, qlora 209 s: a
# rehearsal on a busy machine skips its last sections, which the slow test reports)
ESTIMATE_S = {"speed": (40, 15), "steps": (15, 15), "memory": (20, 8), "auto_batch": (40, 8),
              "batched_vs_alone": (10, 5), "training": (25, 40), "attention": (15, 15), "stage1_peak": (10, 20),
              "long_decode": (60, 15), "split": (25, 8), "qlora": (60, 60)}
LONG_ESTIMATE_TOKENS = (1024, 256)
DECODE_RATIO_MAX = 1.03  # the chain's decode loop (agents=1, batch 1) against HF generate
SHARE_MIN = 0.8  # DiffMAS's batch-8 speedup as a share of HF generate's


class BudgetExceeded(BaseException):
    """Raised by the alarm in whatever section is running when ``--budget-s`` runs out (a ``BaseException``, so
    a section's own ``except Exception`` cannot swallow it)."""


def _alarm(signum, frame):
    raise BudgetExceeded


def judge(sections: dict, timing: bool) -> list[dict]:
    """Each target a section records, with its value and whether it was met: a raise, ``loss_fell`` (qlora),
    ``same_generations`` (split, all rows), and with ``timing`` the decode ratios (``long_decode``'s chain over
    ``generate`` at most ``DECODE_RATIO_MAX``; ``speed``'s DiffMAS batch-8 speedup share at least ``SHARE_MIN``).
    Timing targets are not judged on a tiny CPU rehearsal (a 64-wide model times Python overhead), only listed."""
    out = []

    def add(name: str, value, target: str, met: bool, judged: bool = True) -> None:
        out.append({"target": name, "value": value, "wanted": target, "met": met, "judged": judged})

    for section, value in sections.items():
        if isinstance(value, dict) and "error" in value:
            add(f"{section} runs", "raised", "no error", False)
    qlora = sections.get("qlora")
    if isinstance(qlora, dict) and "loss_fell" in qlora:
        add("qlora loss_fell", qlora["loss_fell"], "true", bool(qlora["loss_fell"]))
    split = sections.get("split")
    if isinstance(split, dict) and "same_generations" in split:
        same, total = split["same_generations"].split("/")
        add("split same_generations", split["same_generations"], "all rows", same == total)
    long = sections.get("long_decode")
    if isinstance(long, dict):
        for key, ratio in long.items():
            if key.startswith("chain_over_generate_"):
                add(f"long_decode {key}", round(ratio, 3), f"<= {DECODE_RATIO_MAX}", ratio <= DECODE_RATIO_MAX, timing)
    speed = sections.get("speed")
    if isinstance(speed, list):
        for r in speed:
            if r["batch"] == 8:
                share = r["diffmas_speedup_share"]
                add("speed diffmas_speedup_share b8", round(share, 3), f">= {SHARE_MIN}", share >= SHARE_MIN, timing)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny Qwen3 shapes and small sizes (a CPU rehearsal)")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default qwen3-8b (qwen3-tiny with --tiny)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 8 32 (1 2 with --tiny)")
    p.add_argument("--sections", nargs="+", default=list(ESTIMATE_S), choices=list(ESTIMATE_S))
    p.add_argument("--long-tokens", type=int, default=None,
                   help="long_decode's budget (default 1024; 256 with --tiny); 8192 as a call of its own")
    p.add_argument("--split-shape", default=None, choices=sorted(SHAPES),
                   help="the split section's shape (default qwen3-0.6b, untied: half its layers run on the CPU)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall seconds for the whole run (default 300 on a GPU, none on a CPU): sections that "
                        "cannot fit are skipped, and recorded so")
    p.add_argument("--out", default="gpu_results")
    args = p.parse_args(argv)
    import peft
    import transformers

    shape = args.shape or ("qwen3-tiny" if args.tiny else "qwen3-8b")
    batches = args.batches or ([1, 2] if args.tiny else [1, 8, 32])
    env = Env(args.device, args.tiny)
    budget = args.budget_s if args.budget_s is not None else (300.0 if env.device.type == "cuda" else None)
    long_tokens = args.long_tokens or (256 if args.tiny else 1024)
    dtype = getattr(torch, args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if env.device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    results = {"device_name": name, "device": args.device, "shape": shape, "dtype": args.dtype, "config": SHAPES[shape],
               "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
               "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "budget_s": budget, "sections": {},
               "section_s": {}}
    t_start = time.perf_counter()
    model, config = env.model(shape, dtype)
    results["model_init_s"] = time.perf_counter() - t_start
    new_tokens = 16 if args.tiny else 64
    plan = {
        "speed": lambda: speed(env, model, batches, new_tokens),
        "steps": lambda: steps(env, model, batches[-1], new_tokens),
        "memory": lambda: memory(env, model, config, shape, [256, 1024] if args.tiny else [4096, 32768]),
        "auto_batch": lambda: auto_batch(env, model, 8 if args.tiny else 128, 64 if args.tiny else 1024),
        "batched_vs_alone": lambda: batched_vs_alone(env, model),
        "training": lambda: training(env, model, 1 if args.tiny else 4),
        "attention": lambda: attention(env, model),
        "stage1_peak": lambda: stage1_peak(env, model, 2 if args.tiny else 8),
        "long_decode": lambda: long_decode(env, model, long_tokens),
        "split": lambda: split(env, args.split_shape or ("qwen3-tiny" if args.tiny else "qwen3-0.6b"), new_tokens),
        "qlora": lambda: qlora(env, shape, dtype, 1 if args.tiny else 4),
    }
    column = 1 if args.tiny else 0
    for section in args.sections:
        estimate = ESTIMATE_S[section][column]
        if section == "long_decode":
            estimate *= long_tokens / LONG_ESTIMATE_TOKENS[column]
        left = None if budget is None else budget - (time.perf_counter() - t_start)
        t0 = time.perf_counter()
        if left is not None and estimate > left:
            results["sections"][section] = {"skipped": f"needs about {estimate:.0f} s; {max(left, 0):.0f} s of the "
                                                       f"{budget:.0f} s budget left (rerun with --sections {section})"}
        else:
            if left is not None:
                signal.signal(signal.SIGALRM, _alarm)
                signal.setitimer(signal.ITIMER_REAL, left)
            try:
                results["sections"][section] = plan[section]()
            except BudgetExceeded:
                results["sections"][section] = {
                    "skipped": f"the {budget:.0f} s budget ran out {time.perf_counter() - t0:.0f} s into this section "
                               f"(rerun with --sections {section})"}
            except Exception:  # record it and go on: one broken section must not cost the others' numbers
                results["sections"][section] = {"error": traceback.format_exc()}
            finally:
                if left is not None:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        env.peak_reset()
        results["section_s"][section] = round(time.perf_counter() - t0, 1)
        print(f"{section}: {time.perf_counter() - t0:.1f} s", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        (out / "gpu_check.md").write_text(markdown(results) + "\n")
    results["total_s"] = time.perf_counter() - t_start
    results["targets"] = judge(results["sections"], timing=not args.tiny)
    missed = [t for t in results["targets"] if t["judged"] and not t["met"]]
    results["passed"] = not missed
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(results) + "\n")
    print(markdown(results))
    print("PASS" if not missed else "FAIL: " + "; ".join(f"{t['target']} = {t['value']} (wanted {t['wanted']})"
                                                         for t in missed))
    return 1 if missed else 0


with contextlib.suppress(Exception):
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 runs stay float32 (the reference for drift)

if __name__ == "__main__":
    raise SystemExit(main())
