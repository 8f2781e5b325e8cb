"""Latency per question at a fixed answer budget: single model, text MAS and DiffMAS, batch 1 and 8.

Everything is measured in one process on the same questions and reported as ratios (absolute
times on a shared machine are noise):

- per method: seconds and generated tokens per question at batch 1 and batch B, and the batch
  speedup (s/question at 1 over s/question at B), against HF ``generate``'s own speedup;
- the floor: each method's unavoidable sequential forwards (prompt prefills, latent steps, decode
  steps), each priced by a bare forward of the same shape measured here, and each method's time as
  a multiple of its floor (stage 1 of DiffMAS separately);
- long answers: a decode step's time against the length of what is cached, with the trace in a
  preallocated cache (what ``chain.generate`` does) and in a concatenating ``DynamicCache``.

EOS is ignored so every method writes exactly its budget. Methods: ``single`` (HF ``generate`` on the
question's chat prompt), ``textmas`` (4 agents; each upstream agent writes ``--agent-tokens``, the
final one ``--new-tokens``), ``diffmas`` at latent steps ``--latent-steps`` (4 agents).

    python benchmarks/latency.py --questions 8 --new-tokens 64 --batch 1 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from diffmas_eval import DEFAULT_MODEL
from diffmas_eval.latent import AgentChain, LatentConfig
from diffmas_eval.latent.trace import GrowingLayer
from diffmas_eval.models import load_model
from diffmas_eval.prompts import ROLES, chat_format, text_preamble, text_upstream_user
from diffmas_eval.tasks.utils import read_jsonl


def gsm8k(n: int) -> list[str]:
    data = Path(os.environ.get("DIFFMAS_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    return [r["question"] for r in read_jsonl(data / "gsm8k" / "test.jsonl", ("question",))[:n]]


def clock(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


class Bench:
    def __init__(self, model, tok, new_tokens: int, agent_tokens: int):
        self.model, self.tok, self.new, self.agent_tokens = model, tok, new_tokens, agent_tokens
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def hf_generate(self, prompts: list[list[int]], new: int) -> torch.Tensor:
        width = max(map(len, prompts))
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=self.pad)
        return out[:, width:]

    # -- the methods: each returns generated tokens per question -----------------------------------
    def single(self, questions: list[str]) -> float:
        prompts = [self.ids(self.tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                         add_generation_prompt=True)) for q in questions]
        return self.hf_generate(prompts, self.new).shape[1]

    def textmas(self, questions: list[str], agents: int = 4) -> float:
        roles = ["planner", "critic", "refiner"][:agents - 1]
        notes: list[list[tuple[str, str]]] = [[] for _ in questions]
        for role in roles:
            prompts = [self.ids(chat_format(self.tok, ROLES[role].instruction, text_upstream_user(q, n)))
                       for q, n in zip(questions, notes)]
            out = self.hf_generate(prompts, self.agent_tokens)
            for n, row in zip(notes, out.tolist()):
                n.append((role, self.tok.decode(row, skip_special_tokens=True)))
        finals = [self.ids(chat_format(self.tok, ROLES["solver"].instruction, text_preamble(n) + q))
                  for q, n in zip(questions, notes)]
        self.hf_generate(finals, self.new)
        return len(roles) * self.agent_tokens + self.new

    def diffmas(self, chain: AgentChain, questions: list[str], stages: dict) -> float:
        finals = [chain.final_prompt(q) for q in questions]
        with torch.no_grad():
            s1, trace = clock(lambda: chain.stage1(questions))
            s2, _ = clock(lambda: chain.generate(trace, finals, max_new_tokens=self.new, ignore_eos=True))
        stages["stage1"].append(s1 / len(questions))
        stages["stage2"].append(s2 / len(questions))
        stages["trace"].append(trace.length)
        return self.new

    # -- bare forwards: the price of each unavoidable sequential forward ---------------------------
    @torch.no_grad()
    def prefill(self, batch: int, n: int, cached: int) -> float:
        """One forward of ``n`` new tokens over ``cached`` positions, batch ``batch``."""
        cache = self._cache(batch, cached, 0)
        ids = torch.full((batch, n), 100)
        return clock(lambda: self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1))[0]

    @torch.no_grad()
    def step(self, batch: int, cached: int, reps: int = 8, growing: bool = True) -> float:
        """Mean time of one decode step over ``cached`` positions (preallocated or concatenating cache)."""
        cache = self._cache(batch, cached, reps if growing else 0)
        ids = torch.full((batch, 1), 100)
        self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)  # warm
        t, _ = clock(lambda: [self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                              for _ in range(reps)])
        return t / reps

    def _cache(self, batch: int, cached: int, reserve: int) -> DynamicCache:
        cache = DynamicCache()
        if cached:
            self.model(input_ids=torch.full((batch, cached), 100), past_key_values=cache, use_cache=True,
                       logits_to_keep=1)
            if reserve:
                cache.layers = [GrowingLayer(layer.keys, layer.values, reserve + 1) for layer in cache.layers]
        return cache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--agent-tokens", type=int, default=64, help="text MAS: tokens each upstream agent writes")
    p.add_argument("--latent-steps", type=int, nargs="+", default=[0, 10, 40])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--long", type=int, nargs="*", default=[256, 1024, 4096],
                   help="cached lengths for the long-answer decode-step table (none: skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_model(args.model, dtype="float32")
    bench = Bench(model, tok, args.new_tokens, args.agent_tokens)
    questions = gsm8k(args.questions)
    chains = {m: AgentChain(model, tok, LatentConfig.from_dict({"agents": 4, "latent_steps": m}))
              for m in args.latent_steps}
    bench.single(questions[:1])  # warm-up
    rows, stages = [], {}
    for bs in args.batch:
        methods = {"single": bench.single, "textmas": bench.textmas}
        for m, chain in chains.items():
            stages[(m, bs)] = {"stage1": [], "stage2": [], "trace": []}
            methods[f"diffmas m={m}"] = (lambda c, st: lambda qs: bench.diffmas(c, qs, st))(chain, stages[(m, bs)])
        for name, fn in methods.items():
            t, tokens = 0.0, 0
            for q0 in range(0, len(questions), bs):
                t0 = time.perf_counter()
                n = fn(questions[q0:q0 + bs])
                t, tokens = t + time.perf_counter() - t0, tokens + n
            rows.append({"method": name, "batch": bs, "s_per_q": t / len(questions),
                         "tokens_per_q": tokens * bs / len(questions)})
            print(f"  measured {name} batch {bs}: {t / len(questions):.3f} s/question", file=sys.stderr, flush=True)

    # floors: sequential forwards x the measured price of a bare forward of that shape (batch 1)
    q_ids = [bench.ids(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                               add_generation_prompt=True)) for q in questions]
    prompt_len = statistics.mean(map(len, q_ids))
    floors = {}
    for m, chain in chains.items():
        trace = statistics.mean(stages[(m, 1)]["trace"])
        agent_prompts = [statistics.mean(len(r) for r in a) for a in chain.upstream_prompts(questions)]
        final_len = statistics.mean(len(chain.final_prompt(q)) for q in questions)
        s1, cached = 0.0, 0
        for n in agent_prompts:
            s1 += bench.prefill(1, int(n), int(cached)) + m * bench.step(1, int(cached + n + m / 2))
            cached += n + m
        s2 = bench.prefill(1, int(final_len), int(trace)) + (args.new_tokens - 1) * bench.step(
            1, int(trace + final_len + args.new_tokens / 2))
        floors[f"diffmas m={m}"] = {"stage1": s1, "total": s1 + s2}
    floors["single"] = {"total": bench.prefill(1, int(prompt_len), 0) + (args.new_tokens - 1) * bench.step(
        1, int(prompt_len + args.new_tokens / 2))}
    text_prompt = prompt_len + 30
    t_floor, cached_notes = 0.0, 0
    for _ in range(3):
        t_floor += bench.prefill(1, int(text_prompt + cached_notes), 0) + (args.agent_tokens - 1) * bench.step(
            1, int(text_prompt + cached_notes + args.agent_tokens / 2))
        cached_notes += args.agent_tokens
    t_floor += bench.prefill(1, int(text_prompt + cached_notes), 0) + (args.new_tokens - 1) * bench.step(
        1, int(text_prompt + cached_notes + args.new_tokens / 2))
    floors["textmas"] = {"total": t_floor}

    single = {r["batch"]: r["s_per_q"] for r in rows if r["method"] == "single"}
    b1, bn = min(args.batch), max(args.batch)
    print(f"\nmodel={args.model}, float32, {args.threads} threads, first {len(questions)} GSM8K questions, "
          f"{args.new_tokens} new tokens per answer (EOS ignored), textmas upstream agents {args.agent_tokens} "
          "tokens each, 4 agents\n")
    print(f"| method | tokens / question | s / question (batch {b1}) | × single | × floor | "
          f"s / question (batch {bn}) | batch {bn} speedup |")
    print("|---|---|---|---|---|---|---|")
    by = {(r["method"], r["batch"]): r for r in rows}
    for name in dict.fromkeys(r["method"] for r in rows):
        r1, rn = by[(name, b1)], by[(name, bn)]
        t1, tn = r1["s_per_q"], rn["s_per_q"]
        print(f"| {name} | {r1['tokens_per_q']:.0f} | {t1:.3f} | {t1 / single[b1]:.2f} | "
              f"{t1 / floors[name]['total']:.2f} | {tn:.3f} | {t1 / tn:.2f} |")
    print("\n| diffmas | stage 1 s (batch 1) | stage 1 × floor | stage 2 s (batch 1) | stage 1 speedup at batch "
          f"{bn} | stage 2 speedup at batch {bn} |")
    print("|---|---|---|---|---|---|")
    for m in chains:
        a, b = stages[(m, b1)], stages[(m, bn)]
        s1, s2 = statistics.mean(a["stage1"]), statistics.mean(a["stage2"])
        print(f"| m={m} | {s1:.3f} | {s1 / floors[f'diffmas m={m}']['stage1']:.2f} | {s2:.3f} | "
              f"{s1 / statistics.mean(b['stage1']):.2f} | {s2 / statistics.mean(b['stage2']):.2f} |")
    text = by[("textmas", b1)]["s_per_q"]
    for m in chains:
        print(f"textmas / diffmas m={m} (batch {b1}): {text / by[(f'diffmas m={m}', b1)]['s_per_q']:.2f}x")
    # where batching can and cannot help here: a prefill is compute-bound, a decode step reads the weights
    cached = int(statistics.mean(stages[(next(iter(chains)), b1)]["trace"]))
    pre = bench.prefill(1, int(prompt_len), cached) * bn / bench.prefill(bn, int(prompt_len), cached)
    dec = bench.step(1, cached) * bn / bench.step(bn, cached)
    print(f"\nbare forwards, batch {bn} vs 1 (rows per second): a prefill of {int(prompt_len)} tokens over {cached} "
          f"cached positions {pre:.2f}x; a decode step over {cached} {dec:.2f}x")
    long_rows = []
    if args.long:
        per_pos = 2 * sum(layer.keys[0, :, 0].numel() * 4 for layer in bench._cache(1, 1, 0).layers)
        print("\n| cached positions | decode step, preallocated (s) | decode step, concatenating (s) | ratio | "
              "bytes written per token, preallocated | bytes copied per token, concatenating |")
        print("|---|---|---|---|---|---|")
        for n in args.long:
            grow, cat = bench.step(1, n, growing=True), bench.step(1, n, growing=False)
            long_rows.append({"cached": n, "preallocated": grow, "concatenating": cat})
            print(f"| {n} | {grow:.4f} | {cat:.4f} | {cat / grow:.2f} | {per_pos:,} | {per_pos * (n + 1):,} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "floors": floors, "long": long_rows,
                                               "bare_batch_speedup": {"prefill": pre, "decode_step": dec},
                                               "stages": {f"{m}@{b}": v for (m, b), v in stages.items()}}, indent=1))


if __name__ == "__main__":
    main()
