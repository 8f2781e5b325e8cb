"""Stage 1 and stage 2 time of this checkout's chain against an earlier revision's, in one process.

The trace became left-aligned as a whole (each new block right-padded, then one gather per agent
that moves each row's pad columns to its front) so that sliding-window layers see no pad column
inside a row. This prints what that costs: both chains run the same batch on the same model,
alternating, and the table gives medians and new/old ratios (absolute times on a shared machine
are noise; the ratios are the result).

    python benchmarks/trace_layout.py --baseline HEAD~1 --batch 1 4 --repeats 3
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import torch

from diffmas_eval import DEFAULT_MODEL
from diffmas_eval.latent import AgentChain, LatentConfig
from diffmas_eval.models import load_model

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
]


def baseline_chain_class(rev: str, workdir: Path):
    """``AgentChain`` of the package at git revision ``rev``, imported as ``diffmas_eval_base``."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "diffmas_eval"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(workdir, filter="data")
    (workdir / "diffmas_eval").rename(workdir / "diffmas_eval_base")
    sys.path.insert(0, str(workdir))
    return importlib.import_module("diffmas_eval_base.latent").AgentChain, importlib.import_module(
        "diffmas_eval_base.latent").LatentConfig


def timed(chain, questions: list[str], new_tokens: int) -> tuple[float, float, list[list[int]]]:
    finals = [chain.final_prompt(q) for q in questions]
    with torch.no_grad():
        t0 = time.perf_counter()
        trace = chain.stage1(questions)
        t1 = time.perf_counter()
        gens = chain.generate(trace, finals, max_new_tokens=new_tokens)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, [g.token_ids for g in gens]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--baseline", default="HEAD~1", help="git revision of the chain to compare against")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--latent-steps", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype="float32")
    opts = {"agents": args.agents, "latent_steps": args.latent_steps}
    with tempfile.TemporaryDirectory() as tmp:
        base_cls, base_cfg = baseline_chain_class(args.baseline, Path(tmp))
        chains = {"old": base_cls(model, tok, base_cfg.from_dict(opts)), "new": AgentChain(model, tok,
                                                                                          LatentConfig.from_dict(opts))}
        print(f"model={args.model} agents={args.agents} latent_steps={args.latent_steps} "
              f"new_tokens={args.new_tokens} (EOS not ignored) threads={args.threads}; baseline={args.baseline}")
        print(f"{'batch':>5} {'stage':>7} {'old s':>8} {'new s':>8} {'new/old':>8}  same answers")
        for bs in args.batch:
            qs = (QUESTIONS * bs)[:bs]
            times = {k: ([], []) for k in chains}
            answers = {}
            timed(chains["new"], qs[:1], 2)  # warm-up
            for _ in range(args.repeats):
                for name, chain in chains.items():
                    s1, s2, ids = timed(chain, qs, args.new_tokens)
                    times[name][0].append(s1)
                    times[name][1].append(s2)
                    answers[name] = ids
            same = answers["old"] == answers["new"]
            for k, stage in enumerate(("stage 1", "stage 2")):
                old, new = (statistics.median(times[n][k]) for n in ("old", "new"))
                print(f"{bs:>5} {stage:>7} {old:>8.3f} {new:>8.3f} {new / old:>8.2f}  {same}")


if __name__ == "__main__":
    main()
