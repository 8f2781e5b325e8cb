"""How far the latent loop drifts in bf16 / float16 from float32, and float32 from float64, per agent.

Latent steps are an iterated map (last hidden state -> realignment -> next input), so rounding made
in one agent's latent steps is fed back into every later one; on some models the loop amplifies it.
For each model this runs the same chain in each dtype (weights cast from one float32 copy, the same
questions batched) and reports, per upstream agent, the relative difference of the latent vectors it
fed the model (``||x - x_ref|| / ||x_ref||``, worst row) and, for the final agent's first answer
token, the largest log-probability difference and whether the greedy token is the same. The same
comparison with ``latent_steps=0`` is the floor: what the dtype does to the prompts alone, with no
loop. ``--latent-dtype float32`` rows run the half-precision chains with ``latent_dtype=float32``
(stage 1 in float32, the trace then cast to the model's dtype) and report its cost in time.
A last table compares each row batched against the row alone, in each dtype.

    python benchmarks/precision.py --models bundled:smollm2-135m-instruct tiny:gemma3 tiny:qwen3 tiny:llama
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffmas_eval import DEFAULT_MODEL
from diffmas_eval.latent import AgentChain, LatentConfig
from diffmas_eval.models import DTYPES, load_model
from diffmas_eval.testing.tiny import make_tiny_model

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "What is 12 + 30?",
    "Which is heavier, a kilogram of feathers or a kilogram of iron? Answer (A) feathers (B) iron (C) same.",
]
# (compared, reference, latent_dtype of the compared chain)
PAIRS = [("float32", "float64", "model"), ("bfloat16", "float32", "model"), ("float16", "float32", "model")]


def load(name: str):
    """A float32 model and its tokenizer: ``tiny:ARCH`` (random, ``diffmas_eval.testing.tiny``) or anything
    ``load_model`` takes."""
    if name.startswith("tiny:"):
        return make_tiny_model(name.split(":", 1)[1])
    return load_model(name, dtype="float32", device="cpu")


@torch.no_grad()
def run(model, tok, agents: int, m: int, questions: list[str], latent_dtype: str = "model") -> dict:
    """Per agent the fed latent vectors ``[B, m, hidden]`` (float64), the final agent's log-probs at
    its first answer token ``[B, V]`` (float64), and stage 1's time."""
    chain = AgentChain(model, tok, LatentConfig.from_dict(
        {"agents": agents, "latent_steps": m, "latent_dtype": latent_dtype}))
    t0 = time.perf_counter()
    trace = chain.stage1(questions, record_inputs=True)
    seconds = time.perf_counter() - t0
    _, logits = chain.prefill(trace, [chain.final_prompt(q) for q in questions])
    latents = [s.latents.double() if s.latents is not None else None for s in trace.history]
    return {"latents": latents, "logprobs": F.log_softmax(logits.double(), -1), "stage1_s": seconds,
            "trace_dtype": str(trace.keys[0].dtype).replace("torch.", "") if trace.keys[0] is not None else None}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Worst row's ``||a - b|| / ||b||`` over everything after the batch dimension."""
    return float(((a - b).flatten(1).norm(dim=-1) / b.flatten(1).norm(dim=-1).clamp(min=1e-30)).max())


def answer_drift(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Final agent's first token: largest |log p| difference on the reference's top-10 tokens; greedy agreement."""
    top = b.topk(10, dim=-1).indices
    return {"dlogp": float((a.gather(-1, top) - b.gather(-1, top)).abs().max()),
            "same_top1": int((a.argmax(-1) == b.argmax(-1)).sum()), "rows": len(b)}


def compare(name: str, model32, tok, agents: int, m: int, pairs: list[tuple[str, str, str]]) -> list[dict]:
    models = {"float32": model32}
    results = {}
    rows = []
    for dtype, ref, latent in pairs:
        for d in (dtype, ref):
            if d not in models:
                models[d] = copy.deepcopy(model32).to(DTYPES[d])
                if d == "float64":  # eager softmax runs in float32, where finfo(float64).min is -inf: NaN
                    models[d].set_attn_implementation("sdpa")  # for pad queries (the chain refuses those)
        for d, lat in ((dtype, latent), (ref, "model")):
            for steps in (m, 0):
                key = (d, lat, steps)
                if key not in results:
                    results[key] = run(models[d], tok, agents, steps, QUESTIONS, lat)
        got, want = results[(dtype, latent, m)], results[(ref, "model", m)]
        floor = answer_drift(results[(dtype, latent, 0)]["logprobs"], results[(ref, "model", 0)]["logprobs"])
        row = {"model": name, "compared": dtype, "reference": ref, "latent_dtype": latent, "latent_steps": m,
               "per_agent_rel": [rel(a, b) for a, b in zip(got["latents"], want["latents"]) if b is not None],
               "answer": answer_drift(got["logprobs"], want["logprobs"]), "answer_m0": floor,
               "stage1_s": got["stage1_s"], "stage1_s_model_dtype": results[(dtype, "model", m)]["stage1_s"]
               if (dtype, "model", m) in results else None, "trace_dtype": got["trace_dtype"]}
        rows.append(row)
        agents_txt = ", ".join(f"{x:.1e}" for x in row["per_agent_rel"])
        print(f"| {name} | {dtype} vs {ref} | {latent} | {agents_txt} | {row['answer']['dlogp']:.2e} | "
              f"{row['answer']['same_top1']}/{row['answer']['rows']} | {floor['dlogp']:.2e} | "
              f"{row['stage1_s']:.2f} |", flush=True)
    return rows


@torch.no_grad()
def batch_vs_alone(name: str, model32, tok, agents: int, m: int, dtypes: list[str]) -> list[dict]:
    """Per dtype and agent: each row's latent vectors batched vs alone (worst row), and its first-token drift."""
    out = []
    for d in dtypes:
        model = model32 if d == "float32" else copy.deepcopy(model32).to(DTYPES[d])
        batched = run(model, tok, agents, m, QUESTIONS)
        alone = [run(model, tok, agents, m, [q]) for q in QUESTIONS]
        per_agent = []
        for k, lat in enumerate(batched["latents"]):
            if lat is None:
                continue
            per_agent.append(max(rel(lat[i:i + 1], a["latents"][k]) for i, a in enumerate(alone)))
        ans = answer_drift(batched["logprobs"], torch.cat([a["logprobs"] for a in alone]))
        out.append({"model": name, "dtype": d, "latent_steps": m, "per_agent_rel": per_agent, "answer": ans})
        print(f"| {name} | {d} | {', '.join(f'{x:.1e}' for x in per_agent)} | {ans['dlogp']:.2e} | "
              f"{ans['same_top1']}/{ans['rows']} |", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=[DEFAULT_MODEL, "tiny:gemma3", "tiny:qwen3",
                                                   "tiny:llama"])
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--latent-steps", type=int, default=4)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"], help="half precisions compared to float32")
    p.add_argument("--latent-dtype", choices=["model", "float32"], default="float32",
                   help="float32: also run the half-precision chains with latent_dtype=float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = [pr for pr in PAIRS if pr[0] == "float32" or pr[0] in args.dtypes]
    if args.latent_dtype == "float32":
        pairs += [(d, "float32", "float32") for d in args.dtypes]
    print(f"agents={args.agents} latent_steps={args.latent_steps}, {len(QUESTIONS)} questions batched; relative "
          "difference of each upstream agent's fed latent vectors (worst row); final agent's first answer token: "
          "largest |d log p| on the reference's top 10, greedy agreement; the same at latent_steps=0 (no loop) is "
          "the floor\n")
    print("| model | dtype vs reference | latent_dtype | per-agent latent rel. diff | answer max abs d log p | "
          "same greedy token | m=0 floor d log p | stage 1 s |")
    print("|---|---|---|---|---|---|---|---|")
    rows, alone = [], []
    loaded = {}
    for name in args.models:
        loaded[name] = load(name)
        rows += compare(name, *loaded[name], args.agents, args.latent_steps, pairs)
    print("\nBatched (3 rows of different lengths) vs each row alone, same dtype:\n")
    print("| model | dtype | per-agent latent rel. diff | answer max abs d log p | same greedy token |")
    print("|---|---|---|---|---|")
    for name in args.models:
        alone += batch_vs_alone(name, *loaded[name], args.agents, args.latent_steps, ["float32", *args.dtypes])
    if args.json:
        Path(args.json).write_text(json.dumps({"dtype_drift": rows, "batch_vs_alone": alone}, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
