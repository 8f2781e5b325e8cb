"""The leaderboard's generative cells in process against ``--serve vllm``: one run of each, on this machine.

The same miniature leaderboard (the bundled model, GSM8K, greedy) is run twice into one directory: in process,
then with ``--serve vllm`` (the adapters of the first run reused, so only scoring is timed). Per method: the cell's
wall time (lm-eval's whole call: model loading, stage 1, decoding; the server's start is reported apart, once),
generated tokens per question, tokens per second, and whether the served answers equal the in-process ones
(request by request, from the cells' lm-eval request caches). Prints a Markdown table (``make performance``
puts it into docs/performance.md).

    python benchmarks/serve.py --limit 8 --max-gen-toks 64 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

from sqlitedict import SqliteDict

from diffmas_eval import DEFAULT_MODEL
from diffmas_eval.leaderboard.grid.settings import Settings
from diffmas_eval.leaderboard.run import RunOptions, run_leaderboard
from diffmas_eval.leaderboard.runner.serve import ServeOptions

TASK = "diffmas_gsm8k"


def cells(out: Path, method: str) -> dict[str, dict]:
    """The method's cells by how they were decoded ("in_process" | "vllm"): metadata and answers by request."""
    found = {}
    for path in (out / "runs" / method).glob(f"results_{TASK}_*.json"):
        meta = json.loads(path.read_text())["leaderboard"]
        db = out / "cache" / "lm_eval" / path.stem / f"{method}_rank0.db"
        with SqliteDict(str(db)) as d:
            found[meta["decoding"]["backend"]] = {"meta": meta, "answers": dict(d.items())}
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--methods", default="single,single-sft,textmas,latentmas,diffmas")
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--max-gen-toks", type=int, default=64)
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--latent-steps", type=int, default=4)
    p.add_argument("--agent-max-tokens", type=int, default=32)
    p.add_argument("--batch-size", default="8")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight per served cell")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--vllm-python", default=None)
    p.add_argument("--output", default=None, help="the leaderboard directory (default: a temporary one)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    out = Path(args.output or tempfile.mkdtemp(prefix="serve-bench-"))
    methods = args.methods.split(",")

    def settings() -> Settings:
        return Settings(model=args.model, limit=args.limit, agents=args.agents, latent_steps=args.latent_steps,
                        agent_max_tokens=args.agent_max_tokens, max_gen_toks=args.max_gen_toks,
                        sft_examples={"math": 16})

    base = dict(methods=args.methods, tasks=TASK, threads=args.threads, batch_size=args.batch_size)
    with contextlib.redirect_stdout(sys.stderr):  # the runs' progress; stdout is the Markdown table alone
        run_leaderboard(settings(), RunOptions(**base), out / "leaderboard.csv")
        t0 = time.perf_counter()
        serve = ServeOptions(backend="vllm", vllm_python=args.vllm_python, concurrency=args.concurrency)
        run_leaderboard(settings(), RunOptions(**base, serve=serve), out / "leaderboard.csv")
        served_total = time.perf_counter() - t0
    rows = []
    for method in methods:
        found = cells(out, method)
        local, remote = found["in_process"], found["vllm"]
        row = {"method": method}
        for name, cell in (("in_process", local), ("vllm", remote)):
            meta = cell["meta"]
            tokens = float(meta.get("tokens_per_sample") or 0) * args.limit
            row[f"{name}_s"] = meta["seconds"]
            row[f"{name}_tokens_per_s"] = tokens / meta["seconds"] if meta["seconds"] else 0.0
        row["tokens_per_q"] = local["meta"].get("tokens_per_sample")
        row["same_answers"] = local["answers"] == remote["answers"]
        rows.append(row)
    log = out / "cache" / "logs" / "vllm-server.log"
    result = {"model": args.model, "limit": args.limit, "max_gen_toks": args.max_gen_toks, "rows": rows,
              "served_run_s": served_total, "server_log": str(log)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.model}, {TASK}, first {args.limit} questions, greedy, answers capped at {args.max_gen_toks} tokens; "
          f"{args.agents} agents, {args.latent_steps} latent steps, {args.agent_max_tokens} tokens per upstream text "
          f"agent; batch {args.batch_size} in process, {args.concurrency} requests in flight served (1 for a trained "
          "latent cell: `serve.cell_concurrency`). One run each; "
          f"the served run took {served_total:.0f} s in all, the server's start included.\n")
    print("| method | in process s | served s | in process tokens/s | served tokens/s | served / in process | "
          "same answers |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["vllm_s"] / r["in_process_s"] if r["in_process_s"] else float("nan")
        print(f"| {r['method']} | {r['in_process_s']:.1f} | {r['vllm_s']:.1f} | {r['in_process_tokens_per_s']:.2f} | "
              f"{r['vllm_tokens_per_s']:.2f} | {ratio:.2f}x | {r['same_answers']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
