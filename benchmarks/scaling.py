"""Trace bytes and stage-1 time against agents (1..8) and latent steps (0..80), with fitted slopes.

The method's cost claim: the trace grows by (prompt + m) positions per upstream agent, so its bytes
and stage 1's time are linear in the number of agents and in the latent steps. Each sweep prints
its points, the least-squares slope and R^2 of the linear fit (1.0: exactly linear), measured in
one process on one question.

    python benchmarks/scaling.py --agents 1 2 3 4 5 6 7 8 --latent-steps 0 10 20 40 80
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from diffmas_eval import DEFAULT_MODEL
from diffmas_eval.latent import AgentChain, LatentConfig
from diffmas_eval.models import load_model

QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?")


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Slope and R^2 of the least-squares line through (xs, ys)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    ss_res = sum((y - (my + slope * (x - mx))) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys) or 1.0
    return slope, 1 - ss_res / ss_tot


@torch.no_grad()
def measure(model, tok, agents: int, m: int, repeats: int) -> dict:
    chain = AgentChain(model, tok, LatentConfig.from_dict({"agents": agents, "latent_steps": m}))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        trace = chain.stage1([QUESTION])
        times.append(time.perf_counter() - t0)
    return {"agents": agents, "latent_steps": m, "positions": trace.length, "bytes": trace.nbytes,
            "stage1_s": statistics.median(times)}


def sweep(name: str, points: list[dict], key: str) -> dict:
    xs = [p[key] for p in points]
    print(f"\n| {key} | trace positions | trace bytes | stage 1 s |")
    print("|---|---|---|---|")
    for p in points:
        print(f"| {p[key]} | {p['positions']} | {p['bytes']:,} | {p['stage1_s']:.3f} |")
    out = {}
    for what in ("bytes", "stage1_s"):
        slope, r2 = fit(xs, [p[what] for p in points])
        out[what] = {"slope": slope, "r2": r2}
        print(f"{name}: {what} per {key.replace('_', ' ')}: slope {slope:,.4g}, R^2 {r2:.4f}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--agents", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8])
    p.add_argument("--latent-steps", type=int, nargs="+", default=[0, 10, 20, 40, 80])
    p.add_argument("--fixed-agents", type=int, default=4, help="agents during the latent-steps sweep")
    p.add_argument("--fixed-steps", type=int, default=10, help="latent steps during the agents sweep")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype="float32")
    measure(model, tok, 2, 1, 1)  # warm-up
    print(f"model={args.model}, float32, {args.threads} threads, one GSM8K question, median of {args.repeats}")
    by_agents = [measure(model, tok, a, args.fixed_steps, args.repeats) for a in args.agents]
    by_steps = [measure(model, tok, args.fixed_agents, m, args.repeats) for m in args.latent_steps]
    result = {"agents": sweep(f"latent_steps={args.fixed_steps}", by_agents, "agents"),
              "latent_steps": sweep(f"agents={args.fixed_agents}", by_steps, "latent_steps"),
              "points": by_agents + by_steps}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
