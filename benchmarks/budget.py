"""At what training budget does the trained chain separate from the untrained one? (issue 34, item 2)

Scores ``diffmas`` trained at several steps x batch on the commonsense SFT set against ``latentmas`` (the same
chain untrained), on the leaderboard's multiple-choice tasks, in the leaderboard's own format (chat rows, chat
template, the first 150 items): each budget is a leaderboard ``Settings`` whose ``train_budgets`` names it, run by
the leaderboard's ``run_cells`` into the leaderboard's store, so a budget the leaderboard already trained (its
default) is reused, not retrained, and the cells hash exactly as ``make leaderboard``'s do::

    python benchmarks/budget.py --budgets 25x4,50x4,100x4 --jobs 2 --threads 1

Prints and writes ``benchmarks/results/budget.{json,md}``: per budget and task, both accuracies, the paired
difference with its bootstrap 95% interval, and the adapter's first and last training loss. One run, one seed:
the interval is over items, not over training runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from diffmas_eval import DEFAULT_MODEL
from diffmas_eval.leaderboard.cli import budget
from diffmas_eval.leaderboard.grid.settings import Settings, short_hash
from diffmas_eval.leaderboard.results import compare
from diffmas_eval.leaderboard.results import training_records as adapters
from diffmas_eval.leaderboard.results.collect import items
from diffmas_eval.leaderboard.run import RunOptions, run_cells
from diffmas_eval.tasks.registry import MULTIPLE_CHOICE_TASKS, TASKS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TASKS = [t for t in MULTIPLE_CHOICE_TASKS if TASKS[t].default]


def measure(budgets: list[tuple[int, int]], tasks: list[str], limit: int, output: Path, run: RunOptions,
            model: str) -> list[dict]:
    rows = []
    for steps, batch in budgets:
        settings = Settings(model=model, limits=dict.fromkeys(tasks, limit),
                            train_budgets={"commonsense": (steps, batch)})
        t0 = time.perf_counter()
        paths = run_cells(settings, run, output)
        seconds = time.perf_counter() - t0
        item_rows = items([str(p) for p in paths])
        paired = [r for r in compare.comparisons(item_rows)
                  if (r["method"], r["reference"], r["metric"]) == ("diffmas", "latentmas", "acc")]
        digest = short_hash(settings.training("diffmas", "commonsense"))
        trained, _ = adapters.records([str(output.parent / "cache" / "adapters" / f"diffmas-commonsense-{digest}")])
        record = trained[0] if trained else {}
        for r in paired:
            rows.append({"steps": steps, "batch_size": batch, "rows_seen": steps * batch, "task": r["task"],
                         "items": r["items"], "latentmas": r["reference_score"], "diffmas": r["method_score"],
                         "delta": r["delta"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                         "beyond_noise": r["beyond_noise"], "loss_first": record.get("loss_first"),
                         "loss_last": record.get("loss_last"), "seconds_this_run": round(seconds)})
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"diffmas (trained on the commonsense SFT set, chat rows) against latentmas (the same chain untrained), "
             f"model `{meta['model']}`, {meta['agents']} agents x {meta['latent_steps']} latent steps, the first "
             f"{meta['limit']} items, chat template; paired bootstrap 95% interval over items; one training run per "
             "budget. Loss: the adapter's first and last logged training loss (one batch each).", "",
             "| steps x batch | task | latentmas | diffmas | Δ | 95% CI | beyond noise | loss first → last |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = (f"{float(r['loss_first']):.2f} → {float(r['loss_last']):.2f}" if r["loss_first"] not in (None, "")
                else "")
        lines.append(f"| {r['steps']} x {r['batch_size']} | {r['task']} | {r['latentmas']:.3f} | {r['diffmas']:.3f} | "
                     f"{r['delta']:+.3f} | [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | "
                     f"{'yes' if r['beyond_noise'] else 'no'} | {loss} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--budgets", default="25x4,50x4,100x4", help="STEPSxBATCH,... (default: %(default)s)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    p.add_argument("--limit", type=int, default=150, help="first N items of each task (the leaderboard's MC_LIMIT)")
    p.add_argument("--output", default=str(REPO / "leaderboards" / "leaderboard.csv"),
                   help="the leaderboard whose store (runs/, cache/) is shared; nothing is published there")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "budget"))
    args = p.parse_args()
    budgets = [budget(b) for b in args.budgets.split(",") if b.strip()]
    tasks = [t for t in args.tasks.split(",") if t]
    run = RunOptions(methods="latentmas,diffmas", tasks=",".join(tasks), jobs=args.jobs, threads=args.threads,
                     data_dir=os.environ.get("DIFFMAS_DATA_DIR"))
    rows = measure(budgets, tasks, args.limit, Path(args.output), run, args.model)
    s = Settings()
    meta = {"model": args.model, "agents": s.agents, "latent_steps": s.latent_steps, "limit": args.limit,
            "budgets": args.budgets, "tasks": tasks}
    text = markdown(rows, meta)
    print(text)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
