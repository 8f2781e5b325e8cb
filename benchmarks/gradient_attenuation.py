"""Per-agent gradient norm ||d loss / d segment_k|| for trace=concat vs trace=overwrite.

The paper's central claim: with concatenation every agent's contribution is one attention hop from
the loss, so its gradient does not fade with the agent's distance from the final agent; with an
overwrite interface it must cross every later agent. Prints one row per (agents, mode).

    python benchmarks/gradient_attenuation.py --model bundled:smollm2-135m-instruct --agents 2 3 4 5 6
"""

from __future__ import annotations

import argparse

import torch

from diffmas_eval import DEFAULT_MODEL
from diffmas_eval.latent import AgentChain, LatentConfig
from diffmas_eval.models import load_model

QUESTIONS = [
    ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
     "How many clips did Natalia sell altogether in April and May?", " She sold 48 + 24 = 72 clips. \\boxed{72}"),
    ("A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
     " 2 + 1 = 3 bolts. \\boxed{3}"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--agents", type=int, nargs="+", default=[4])
    p.add_argument("--latent-steps", type=int, default=10)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    model, tok = load_model(args.model, dtype=args.dtype)
    print(f"model={args.model} latent_steps={args.latent_steps}; mean over {len(QUESTIONS)} questions")
    print(f"{'agents':>6} {'trace':>9}  per-agent ||dL/d segment|| (first agent ... last upstream)  first/last")
    for n in args.agents:
        for mode in ("concat", "overwrite"):
            config = LatentConfig.from_dict({"agents": n, "latent_steps": args.latent_steps, "trace": mode})
            chain = AgentChain(model, tok, config)
            norms = torch.zeros(n - 1)
            for q, answer in QUESTIONS:
                prompt, target = chain.final_prompt(q), chain.encode(answer)
                probe = chain.gradient_probe([q], [prompt + target], [[-100] * len(prompt) + target])
                norms += torch.tensor([g for _, g in probe]) / len(QUESTIONS)
            cells = " ".join(f"{g:.2e}" for g in norms.tolist())
            ratio = norms[0] / norms[-1] if n > 1 and norms[-1] > 0 else float("nan")
            print(f"{n:>6} {mode:>9}  {cells}  {ratio:.3f}")


if __name__ == "__main__":
    main()
