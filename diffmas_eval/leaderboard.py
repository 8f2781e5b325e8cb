"""``diffmas-eval leaderboard``: score methods side by side through lm-eval, write a CSV.

Each method is an lm-eval model (``hf`` for the single model, ``diffmas``, ``textmas``) run on the
same tasks and items. ``diffmas`` and ``textmas`` report generated tokens and wall time per sample
(``config.accounting`` of their results); the CSV carries them per task. Every run goes through
lm-eval's request cache, so an interrupted leaderboard resumes where it stopped; each run's results
JSON is kept beside the CSV, and ``--from-results`` rebuilds the table from results JSONs made
anywhere (e.g. a GPU cluster).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import time
from pathlib import Path

DEFAULT_TASKS = "diffmas_arc_challenge,diffmas_gsm8k"
FIELDS = ["method", "task", "metric", "value", "stderr", "n", "model", "model_args", "seconds",
          "tokens_per_sample", "seconds_per_sample"]
METHODS = ("single", "diffmas", "textmas")


def method_model_args(method: str, pretrained: str, agents: int, latent_steps: int, agent_max_tokens: int = 512,
                      textmas_args: str = "") -> tuple[str, str]:
    """The lm-eval model name and model_args of a leaderboard method."""
    from .models import resolve_pretrained

    if method == "single":
        return "hf", f"pretrained={resolve_pretrained(pretrained)}"
    if method == "diffmas":
        return "diffmas", f"pretrained={pretrained},agents={agents},latent_steps={latent_steps}"
    if method == "textmas":
        extra = f",{textmas_args}" if textmas_args else ""
        return "textmas", f"pretrained={pretrained},agents={agents},agent_max_tokens={agent_max_tokens}{extra}"
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def rows_from_results(results: dict, method: str, seconds: float | None = None) -> list[dict]:
    """Flatten one lm-eval results JSON into CSV rows (one per task and metric)."""
    config = results.get("config", {})
    model_args = config.get("model_args", "")
    if isinstance(model_args, dict):
        model_args = ",".join(f"{k}={v}" for k, v in model_args.items())
    pretrained = next((a.split("=", 1)[1] for a in str(model_args).split(",") if a.startswith("pretrained=")), "")
    accounting = config.get("accounting", {}).get("per_task", {})
    rows = []
    for task, metrics in sorted(results["results"].items()):
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        spent = accounting.get(task, {})
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            name, filt = key.split(",", 1)
            stderr = metrics.get(f"{name}_stderr,{filt}")
            rows.append({"method": method, "task": task, "metric": name, "value": round(float(value), 4),
                         "stderr": round(float(stderr), 4) if isinstance(stderr, (int, float)) else "",
                         "n": n, "model": pretrained, "model_args": model_args,
                         "seconds": "" if seconds is None else round(seconds, 1),
                         "tokens_per_sample": spent.get("tokens_per_sample", ""),
                         "seconds_per_sample": spent.get("seconds_per_sample", "")})
    return rows


def _digest(text: str) -> str:
    """lm-eval's request cache keys on the requests only: one cache file per model configuration."""
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def markdown(rows: list[dict]) -> str:
    lines = ["| method | task | metric | value | ± | n | seconds | tokens/sample | s/sample |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['task']} | {r['metric']} | {r['value']:.3f} | {r['stderr']} | {r['n']} | "
              f"{r['seconds']} | {r.get('tokens_per_sample', '')} | {r.get('seconds_per_sample', '')} |" for r in rows]
    return "\n".join(lines)


def add_leaderboard_parser(sub) -> None:
    p = sub.add_parser("leaderboard", help="score methods side by side through lm-eval and write a CSV")
    p.add_argument("--model", default="bundled:smollm2-135m-instruct")
    p.add_argument("--methods", default="single,diffmas,textmas", help="comma-separated: single, diffmas, textmas")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated lm-eval task names")
    p.add_argument("--limit", type=int, default=20, help="items per task (default 20; 0 = all)")
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--latent-steps", type=int, default=10)
    p.add_argument("--agent-max-tokens", type=int, default=512, help="textmas: tokens per upstream agent")
    p.add_argument("--textmas-args", default="",
                   help="extra textmas model_args, e.g. backend=openai,base_url=http://127.0.0.1:8000/v1")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-gen-toks", type=int, default=256)
    p.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                   help="score plain prompts (default: every method applies the model's chat template, as an "
                        "instruct model expects)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--data-dir", default=os.environ.get("DIFFMAS_DATA_DIR"),
                   help="local benchmark data (layout of shared/data); default $DIFFMAS_DATA_DIR, else the hub")
    p.add_argument("--output", default="leaderboards/leaderboard.csv")
    p.add_argument("--from-results", nargs="*", metavar="METHOD=RESULTS.json",
                   help="skip running: build the CSV from existing lm-eval results JSONs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if args.from_results is not None:
        rows = []
        for spec in args.from_results:
            method, _, path = spec.partition("=")
            if not path:
                raise ValueError(f"--from-results takes METHOD=PATH, got {spec!r}")
            rows += rows_from_results(json.loads(Path(path).read_text()), method)
        write_csv(rows, output)
        print(markdown(rows))
        return 0

    import torch
    from lm_eval import simple_evaluate

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    if args.data_dir:
        os.environ["DIFFMAS_DATA_DIR"] = str(Path(args.data_dir).resolve())
    runs_dir = output.parent / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        model, model_args = method_model_args(method, args.model, args.agents, args.latent_steps,
                                              args.agent_max_tokens, args.textmas_args)
        print(f"== {method}: lm_eval --model {model} --model_args {model_args} --tasks {args.tasks}",
              flush=True)
        t0 = time.perf_counter()
        results = simple_evaluate(
            model=model, model_args=model_args, tasks=args.tasks.split(","), limit=args.limit or None,
            batch_size=args.batch_size, device=device, apply_chat_template=args.chat_template,
            gen_kwargs={"max_gen_toks": args.max_gen_toks},
            use_cache=str(runs_dir / f"cache_{method}_{_digest(model_args)}"), random_seed=args.seed,
            numpy_random_seed=args.seed, torch_random_seed=args.seed, fewshot_random_seed=args.seed)
        seconds = time.perf_counter() - t0
        (runs_dir / f"results_{method}.json").write_text(json.dumps(results, indent=1, default=str))
        rows += rows_from_results(results, method, seconds)
        write_csv(rows, output)  # after every method: an interrupted leaderboard keeps what it finished
    print(markdown(rows))
    print(f"\nwrote {output}")
    return 0
