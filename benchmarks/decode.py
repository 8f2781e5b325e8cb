"""The chain's decode loop against HF ``generate``, in one process: host work per token, batching, long answers.

On the bundled model, GSM8K questions, greedy, EOS ignored (every answer is exactly its budget):

- ``agents=1``: the chain's loop on the question's final prompt with an empty trace, against ``generate`` on
  the same ids, at batch 1 and batch B: time ratio (target: within 1.03x at batch 1);
- ``diffmas`` (4 agents, ``--latent-steps``) against ``generate``: each one's batch speedup (s/question at 1
  over s/question at B) and DiffMAS's speedup as a share of ``generate``'s (target: at least 0.8), split into
  stage 1 (the upstream agents; their prompt prefills alone timed too, as ``stage 1 prompts``) and stage 2
  (the final agent's prefill and decode loop, the part this loop owns);
- long answers: ``agents=1`` against ``generate`` at ``--long`` new tokens, batch 1 (target: the same ratio
  at every length, i.e. no per-token host cost that grows with the answer).

Each timing is the smallest of ``--repeats`` runs, the methods alternating within each; only ratios mean
anything on a shared machine.

    python benchmarks/decode.py --questions 8 --new-tokens 64 --long 1024 6144 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
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
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
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
                  "batch": args.batch, "latent_steps": args.latent_steps, "threads": args.threads}
    runs: dict[tuple[str, int], dict[str, float]] = {}
    for _ in range(args.repeats):  # the methods alternate within each repeat; each keeps its smallest time
        for b in (1, args.batch):
            for k in ("generate", "agents=1", "diffmas", "stage 1 prompts"):
                got = per_question(k, b, args.new_tokens)
                runs[k, b] = {part: min(v, runs.get((k, b), got)[part]) for part, v in got.items()}
    t = {(k, b): v["all"] for (k, b), v in runs.items()}
    for b in (1, args.batch):  # where DiffMAS's time goes: its upstream agents, then the final agent's loop
        t["diffmas stage 1", b], t["diffmas stage 2", b] = runs["diffmas", b]["stage 1"], runs["diffmas", b]["stage 2"]
    kinds = ("generate", "agents=1", "diffmas", "diffmas stage 1", "stage 1 prompts", "diffmas stage 2")
    rows["seconds_per_question"] = {f"{k} b{b}": round(t[k, b], 4) for k in kinds for b in (1, args.batch)}
    rows["agents1_over_generate"] = {f"b{b}": round(t["agents=1", b] / t["generate", b], 3) for b in (1, args.batch)}
    speedup = {k: t[k, 1] / t[k, args.batch] for k in kinds}
    rows["batch_speedup"] = {k: round(v, 3) for k, v in speedup.items()}
    rows["diffmas_speedup_share_of_generate"] = round(speedup["diffmas"] / speedup["generate"], 3)
    rows["stage2_speedup_share_of_generate"] = round(speedup["diffmas stage 2"] / speedup["generate"], 3)
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


def table(rows: dict) -> str:
    """The run as Markdown: the three ratios the targets are stated in, then the timings behind them."""
    b = rows["batch"]
    s = rows["seconds_per_question"]
    lines = [f"{rows['model']}, {rows['questions']} GSM8K questions, greedy, EOS ignored, {rows['threads']} threads; "
             f"diffmas = 4 agents x {rows['latent_steps']} latent steps; the smallest of the repeats; "
             "only ratios mean anything on a shared machine",
             "", "| measure | value | target |", "|---|---:|---|",
             f"| agents=1 loop / `generate`, batch 1, {rows['new_tokens']} tokens | "
             f"{rows['agents1_over_generate']['b1']:.3f} | within 1.03 |",
             f"| agents=1 loop / `generate`, batch {b} | {rows['agents1_over_generate'][f'b{b}']:.3f} | |",
             f"| diffmas batch-{b} speedup / `generate`'s | {rows['diffmas_speedup_share_of_generate']:.3f} | "
             "at least 0.8 |",
             f"| diffmas stage 2 (the final agent's loop) batch-{b} speedup / `generate`'s | "
             f"{rows['stage2_speedup_share_of_generate']:.3f} | |"]
    lines += [f"| agents=1 loop / `generate`, batch 1, {n} tokens | {r['ratio']:.3f} | same at every length |"
              for n, r in rows["long"].items()]
    lines += ["", f"| method | s/question, batch 1 | s/question, batch {b} | batch speedup |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {s[f'{k} b1']:.3f} | {s[f'{k} b{b}']:.3f} | {rows['batch_speedup'][k]:.2f}x |"
              for k in ("generate", "agents=1", "diffmas", "diffmas stage 1", "stage 1 prompts", "diffmas stage 2")]
    if rows["long"]:
        lines += ["", "| new tokens (batch 1) | `generate` s | agents=1 loop s | ratio |", "|---:|---:|---:|---:|"]
        lines += [f"| {n} | {r['generate_s']} | {r['agents1_s']} | {r['ratio']:.3f} |" for n, r in rows["long"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
