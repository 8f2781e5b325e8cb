"""The chain's decode loop against HF ``generate``, in one process: host work per token, batching, long answers,
and where decoding stops.

On the bundled model, GSM8K questions, greedy, EOS ignored (every answer is exactly its budget):

- ``agents=1``: the chain's loop on the question's final prompt with an empty trace, against ``generate`` on
  the same ids, at batch 1 and batch B: time ratio (target: within 1.03x at batch 1);
- ``diffmas`` (4 agents, ``--latent-steps``) against ``generate``: each one's batch speedup (s/question at 1
  over s/question at B) and DiffMAS's speedup as a share of ``generate``'s (target: at least 0.8), split into
  stage 1 (the upstream agents; their prompt prefills alone timed too, as ``stage 1 prompts``) and stage 2
  (the final agent's prefill and decode loop, the part this loop owns);
- long answers: ``agents=1`` against ``generate`` at ``--long`` new tokens, batch 1 (target: the same ratio
  at every length, i.e. no per-token host cost that grows with the answer).

With real end-of-sequence (``--eos-questions`` questions in one batch, ``--eos-tokens`` budget): the forwards each
runs (a hook counts them) and the tokens each row keeps, and whether every row's tokens are ``generate``'s
(target: the chain runs no more forwards than ``generate`` and stops at the same token in every row).

Every method runs once untimed first (a fresh process pays one-time costs on its first calls: allocator growth,
kernel selection, lazy imports), then ``--repeats`` times, the methods alternating within each repeat. Each ratio
is computed per repeat and reported as min / median / max over the repeats; a target is judged on the median
(the best run alone hides the spread of a shared machine). Long answers run once each (minutes per run).

    python benchmarks/decode.py --questions 8 --new-tokens 64 --repeats 5 --long 1024 6144 --json out.json
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffmas_eval import DEFAULT_MODEL  # noqa: E402
from diffmas_eval.latent import AgentChain, LatentConfig  # noqa: E402
from diffmas_eval.models import load_model  # noqa: E402
from diffmas_eval.prompts import default_roles  # noqa: E402
from diffmas_eval.tasks.utils import read_jsonl  # noqa: E402


def clock(fn) -> dict[str, float]:
    t0 = time.perf_counter()
    fn()
    return {"all": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--latent-steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--long", type=int, nargs="*", default=[1024, 6144])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--eos-questions", type=int, default=4, help="the real-EOS case: questions in one batch")
    p.add_argument("--eos-tokens", type=int, default=256, help="the real-EOS case: max new tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("--only-eos", action="store_true",
                   help="the real-EOS case alone: its forwards and tokens are counts, which a busy machine cannot move")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    data = Path(os.environ.get("DIFFMAS_DATA_DIR", ROOT.parent / "shared" / "data"))
    questions = [r["question"] for r in read_jsonl(data / "gsm8k" / "test.jsonl", ("question",))[:args.questions]]
    model, tok = load_model(args.model, device="cpu")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    single = AgentChain(model, tok, LatentConfig(roles=default_roles(1)))
    diffmas = AgentChain(model, tok, LatentConfig(roles=default_roles(4), latent_steps=args.latent_steps))
    prompts_only = AgentChain(model, tok, LatentConfig(roles=default_roles(4), latent_steps=0))
    if args.only_eos:
        e = real_eos(model, tok, single, questions[:args.eos_questions], args.eos_tokens, pad)
        print(f"{args.model}, greedy, float32, {args.threads} threads\n\n" + "\n".join(eos_lines(e)))
        if args.json:
            Path(args.json).write_text(json.dumps({"model": args.model, "real_eos": e}, indent=1))
        return

    def generate(prompts: list[list[int]], new: int) -> None:
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(q)) + q for q in prompts])
        mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in prompts])
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=pad)

    def loop(chain: AgentChain, qs: list[str], new: int) -> dict[str, float]:
        prompts = [chain.final_prompt(q) for q in qs]
        t0 = time.perf_counter()
        trace = chain.stage1(qs)  # agents=1: no upstream agent, an empty trace
        t1 = time.perf_counter()
        chain.generate(trace, prompts, max_new_tokens=new, ignore_eos=True)
        t2 = time.perf_counter()
        return {"all": t2 - t0, "stage 1": t1 - t0, "stage 2": t2 - t1}

    def per_question(kind: str, batch: int, new: int) -> dict[str, float]:
        """Seconds per question over all questions, ``batch`` at a time, per part."""
        total: dict[str, float] = {}
        for i in range(0, len(questions), batch):
            qs = questions[i:i + batch]
            if kind == "generate":
                prompts = [single.final_prompt(q) for q in qs]
                parts = clock(lambda prompts=prompts: generate(prompts, new))
            elif kind == "stage 1 prompts":  # the upstream agents' prompt prefills alone (no latent step)
                parts = clock(lambda qs=qs: prompts_only.stage1(qs))
            else:
                parts = loop(single if kind == "agents=1" else diffmas, qs, new)
            for k, v in parts.items():
                total[k] = total.get(k, 0.0) + v / len(questions)
        return total

    rows: dict = {"model": args.model, "questions": len(questions), "new_tokens": args.new_tokens,
                  "batch": args.batch, "latent_steps": args.latent_steps, "threads": args.threads,
                  "repeats": args.repeats}
    kinds = ("generate", "agents=1", "diffmas", "stage 1 prompts")
    for b in (1, args.batch):  # warm-up: every method once, untimed, on its first batch of questions
        for k in kinds:
            if k == "generate":
                generate([single.final_prompt(q) for q in questions[:b]], args.new_tokens)
            elif k == "stage 1 prompts":
                prompts_only.stage1(questions[:b])
            else:
                loop(single if k == "agents=1" else diffmas, questions[:b], args.new_tokens)
    repeats: list[dict[tuple[str, int], float]] = []
    for _ in range(args.repeats):  # the methods alternate within each repeat
        t: dict[tuple[str, int], float] = {}
        for b in (1, args.batch):
            for k in kinds:
                got = per_question(k, b, args.new_tokens)
                t[k, b] = got["all"]
                if k == "diffmas":  # where DiffMAS's time goes: its upstream agents, then the final agent's loop
                    t["diffmas stage 1", b], t["diffmas stage 2", b] = got["stage 1"], got["stage 2"]
        repeats.append(t)
    parts = ("generate", "agents=1", "diffmas", "diffmas stage 1", "stage 1 prompts", "diffmas stage 2")
    rows["seconds_per_question"] = {f"{k} b{b}": round(statistics.median(t[k, b] for t in repeats), 4)
                                    for k in parts for b in (1, args.batch)}

    def spread(values: list[float]) -> dict[str, float]:
        return {"min": round(min(values), 3), "median": round(statistics.median(values), 3),
                "max": round(max(values), 3), "runs": [round(v, 3) for v in values]}

    def share(t: dict, k: str) -> float:
        return (t[k, 1] / t[k, args.batch]) / (t["generate", 1] / t["generate", args.batch])

    rows["agents1_over_generate"] = {f"b{b}": spread([t["agents=1", b] / t["generate", b] for t in repeats])
                                     for b in (1, args.batch)}
    rows["batch_speedup"] = {k: spread([t[k, 1] / t[k, args.batch] for t in repeats]) for k in parts}
    rows["diffmas_speedup_share_of_generate"] = spread([share(t, "diffmas") for t in repeats])
    rows["stage2_speedup_share_of_generate"] = spread([share(t, "diffmas stage 2") for t in repeats])
    rows["targets_met_on_median"] = {
        "agents1_b1_within_1.03": rows["agents1_over_generate"]["b1"]["median"] <= 1.03,
        "diffmas_share_at_least_0.8": rows["diffmas_speedup_share_of_generate"]["median"] >= 0.8}
    rows["real_eos"] = real_eos(model, tok, single, questions[:args.eos_questions], args.eos_tokens, pad)
    long = {}
    for n in args.long:
        prompt = single.final_prompt(questions[0])
        g = clock(lambda prompt=prompt, n=n: generate([prompt], n))["all"]
        c = loop(single, questions[:1], n)["all"]
        long[n] = {"generate_s": round(g, 2), "agents1_s": round(c, 2), "ratio": round(c / g, 3)}
    rows["long"] = long
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


@torch.no_grad()
def real_eos(model, tok, chain: AgentChain, questions: list[str], new: int, pad: int) -> dict:
    """agents=1 against ``generate`` on one batch with real end-of-sequence: forwards (a pre-hook counts them),
    each row's tokens up to its end, whether they are the same, and the time of each."""
    from diffmas_eval.stopping import eos_ids

    prompts = [chain.final_prompt(q) for q in questions]
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(q)) + q for q in prompts])
    mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in prompts])
    eos = eos_ids(model, tok)
    calls: list[int] = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             pad_token_id=pad)
        t1 = time.perf_counter()
        hf_forwards, calls[:] = len(calls), []
        trace = chain.stage1(questions)
        t2 = time.perf_counter()
        gens = chain.generate(trace, prompts, max_new_tokens=new)
        t3 = time.perf_counter()
        chain_forwards = len(calls)
    finally:
        hook.remove()
    hf_rows = [r[:next((j for j, x in enumerate(r) if x in eos), len(r))] for r in out[:, width:].tolist()]
    return {"questions": len(prompts), "max_new_tokens": new, "generate_forwards": hf_forwards,
            "agents1_forwards": chain_forwards, "generate_tokens": [len(r) for r in hf_rows],
            "agents1_tokens": [len(g.token_ids) for g in gens], "ended": [g.stats.stopped for g in gens],
            "same_tokens": [g.token_ids for g in gens] == hf_rows, "generate_s": round(t1 - t0, 2),
            "agents1_s": round(t3 - t2, 2)}


def eos_lines(e: dict) -> list[str]:
    """The real-EOS case as Markdown: forwards and tokens per row of both loops, and whether the target holds."""
    ok = e["same_tokens"] and e["agents1_forwards"] <= e["generate_forwards"]
    return [f"Real end-of-sequence: {e['questions']} questions in one batch, at most {e['max_new_tokens']} "
            "new tokens (target: no more forwards than `generate`, the same tokens in every row)", "",
            "| | forwards | tokens per row | s |", "|---|---:|---|---:|",
            f"| `generate` | {e['generate_forwards']} | {e['generate_tokens']} | {e['generate_s']} |",
            f"| agents=1 loop | {e['agents1_forwards']} | {e['agents1_tokens']} | {e['agents1_s']} |",
            "", f"Same tokens in every row: {'yes' if e['same_tokens'] else 'NO'}; every row ended: "
            f"{'yes' if all(e['ended']) else 'NO'}; target met: {'yes' if ok else 'NO'}."]


def table(rows: dict) -> str:
    """The run as Markdown: the ratios the targets are stated in (min / median / max over the repeats), the
    real-EOS case, then the timings behind them."""
    b = rows["batch"]
    s = rows["seconds_per_question"]

    def cells(r: dict) -> str:
        return f"{r['min']:.3f} | **{r['median']:.3f}** | {r['max']:.3f}"

    lines = [f"{rows['model']}, {rows['questions']} GSM8K questions, greedy, EOS ignored, {rows['threads']} threads; "
             f"diffmas = 4 agents x {rows['latent_steps']} latent steps; every method warmed up once, then "
             f"{rows['repeats']} repeats (methods alternating); each ratio per repeat, targets judged on the median; "
             "only ratios mean anything on a shared machine",
             "", "| measure | min | median | max | target | met (median) |", "|---|---:|---:|---:|---|---|",
             f"| agents=1 loop / `generate`, batch 1, {rows['new_tokens']} tokens | "
             f"{cells(rows['agents1_over_generate']['b1'])} | within 1.03 | "
             f"{'yes' if rows['targets_met_on_median']['agents1_b1_within_1.03'] else 'NO'} |",
             f"| agents=1 loop / `generate`, batch {b} | {cells(rows['agents1_over_generate'][f'b{b}'])} | | |",
             f"| diffmas batch-{b} speedup / `generate`'s | {cells(rows['diffmas_speedup_share_of_generate'])} | "
             f"at least 0.8 | {'yes' if rows['targets_met_on_median']['diffmas_share_at_least_0.8'] else 'NO'} |",
             f"| diffmas stage 2 (the final agent's loop) batch-{b} speedup / `generate`'s | "
             f"{cells(rows['stage2_speedup_share_of_generate'])} | | |"]
    if rows.get("real_eos"):
        lines += ["", *eos_lines(rows["real_eos"])]
    if rows["long"]:
        lines += ["", "| long answer | ratio | target |", "|---|---:|---|"]
        lines += [f"| agents=1 loop / `generate`, batch 1, {n} tokens (one run) | {r['ratio']:.3f} | same at every "
                  "length |" for n, r in rows["long"].items()]
    lines += ["", f"| method | s/question, batch 1 (median) | s/question, batch {b} (median) | batch speedup "
              "(median) |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {s[f'{k} b1']:.3f} | {s[f'{k} b{b}']:.3f} | {rows['batch_speedup'][k]['median']:.2f}x |"
              for k in ("generate", "agents=1", "diffmas", "diffmas stage 1", "stage 1 prompts", "diffmas stage 2")]
    if rows["long"]:
        lines += ["", "| new tokens (batch 1) | `generate` s | agents=1 loop s | ratio |", "|---:|---:|---:|---:|"]
        lines += [f"| {n} | {r['generate_s']} | {r['agents1_s']} | {r['ratio']:.3f} |" for n, r in rows["long"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
