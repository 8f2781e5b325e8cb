"""The chain's decode loop against HF ``generate``, in one process: host work per token, batching, long answers.

On the bundled model, GSM8K questions, greedy, EOS ignored (every answer is exactly its budget):

- ``agents=1``: the chain's loop on the question's final prompt with an empty trace, against ``generate`` on
  the same ids, at batch 1 and batch B: time ratio (target: within 1.03x at batch 1);
- ``diffmas`` (4 agents, ``--latent-steps``) against ``generate``: each one's batch speedup (s/question at 1
  over s/question at B) and DiffMAS's speedup as a share of ``generate``'s (target: at least 0.8);
- long answers: ``agents=1`` against ``generate`` at ``--long`` new tokens, batch 1 (target: the same ratio
  at every length, i.e. no per-token host cost that grows with the answer).

Each timing is the smallest of ``--repeats`` runs, the two sides alternating; only ratios mean anything on a
shared machine.

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


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


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

    def generate(prompts: list[list[int]], new: int) -> None:
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(q)) + q for q in prompts])
        mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in prompts])
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=pad)

    def loop(chain: AgentChain, qs: list[str], new: int) -> None:
        prompts = [chain.final_prompt(q) for q in qs]
        trace = chain.stage1(qs)  # agents=1: no upstream agent, an empty trace
        chain.generate(trace, prompts, max_new_tokens=new, ignore_eos=True)

    def per_question(fn, batch: int, new: int) -> float:
        """Seconds per question over all questions, ``batch`` at a time."""
        total = 0.0
        for i in range(0, len(questions), batch):
            total += fn(questions[i:i + batch], new)
        return total / len(questions)

    def timed(kind: str):
        def run(qs: list[str], new: int) -> float:
            if kind == "generate":
                prompts = [single.final_prompt(q) for q in qs]
                return best(lambda: generate(prompts, new), args.repeats)
            chain = single if kind == "agents=1" else diffmas
            return best(lambda: loop(chain, qs, new), args.repeats)
        return run

    rows: dict = {"model": args.model, "questions": len(questions), "new_tokens": args.new_tokens,
                  "batch": args.batch, "threads": args.threads}
    t = {(k, b): per_question(timed(k), b, args.new_tokens)
         for b in (1, args.batch) for k in ("generate", "agents=1", "diffmas")}
    rows["seconds_per_question"] = {f"{k} b{b}": round(v, 4) for (k, b), v in t.items()}
    rows["agents1_over_generate"] = {f"b{b}": round(t["agents=1", b] / t["generate", b], 3) for b in (1, args.batch)}
    speedup = {k: t[k, 1] / t[k, args.batch] for k in ("generate", "agents=1", "diffmas")}
    rows["batch_speedup"] = {k: round(v, 3) for k, v in speedup.items()}
    rows["diffmas_speedup_share_of_generate"] = round(speedup["diffmas"] / speedup["generate"], 3)
    long = {}
    for n in args.long:
        q = questions[:1]
        g = best(lambda q=q, n=n: generate([single.final_prompt(q[0])], n), 1)
        c = best(lambda q=q, n=n: loop(single, q, n), 1)
        long[n] = {"generate_s": round(g, 2), "agents1_s": round(c, 2), "ratio": round(c / g, 3)}
    rows["long"] = long
    print(json.dumps(rows, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
