"""``diffmas-eval leaderboard``: run the chain offline on a few benchmark questions.

For now: GSM8K questions from the local data directory, the answer of each, and the trace cost.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def add_leaderboard_parser(sub) -> None:
    from .cli import add_chain_args

    p = sub.add_parser("leaderboard", help="run the chain on a few offline benchmark questions")
    p.add_argument("--data-dir", default=os.environ.get("DIFFMAS_DATA_DIR"),
                   help="local benchmark data (layout of ../shared/data); default $DIFFMAS_DATA_DIR")
    p.add_argument("--limit", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    add_chain_args(p)
    p.set_defaults(func=run)


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg}); fix or remove the line") from err
    return rows


def run(args: argparse.Namespace) -> int:
    import torch

    from .cli import build_chain, format_trace_table

    if not args.data_dir:
        raise ValueError("no data directory: pass --data-dir or set DIFFMAS_DATA_DIR (e.g. ../shared/data)")
    rows = read_jsonl(Path(args.data_dir) / "gsm8k" / "test.jsonl", args.limit)
    chain = build_chain(args)
    questions = [r["question"] for r in rows]
    finals = [chain.final_prompt(q) for q in questions]
    with torch.no_grad():
        t0 = time.perf_counter()
        trace = chain.stage1(questions, final_tokens=[len(f) + args.max_new_tokens for f in finals])
        t1 = time.perf_counter()
        answers = chain.generate(trace, finals, max_new_tokens=args.max_new_tokens)
        t2 = time.perf_counter()
    for row, ans in zip(rows, answers):
        gold = row["answer"].split("####")[-1].strip()
        print(f"Q: {row['question'][:100]}\nA: {ans.text.strip()[:200]}\ngold: {gold}\n")
    print(format_trace_table(trace))
    print(f"\n{len(rows)} questions, batched: stage 1 {t1 - t0:.2f} s, stage 2 {t2 - t1:.2f} s")
    return 0
