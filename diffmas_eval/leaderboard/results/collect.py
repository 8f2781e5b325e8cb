"""The collector: lm-eval results JSONs and EvalPlus result files, made here or anywhere, into tidy rows.

A file is read as the tool wrote it. Which method it belongs to comes from our metadata when the
leaderboard made it, else from ``METHOD=path``, else from the model it names (``hf`` -> single, or
single-sft with ``peft=``; ``diffmas`` -> latentmas, or diffmas with ``peft=``; ``textmas``). One cell
(model, method, task, metric) seen twice with the same value is kept once; with two different values
it is an error naming both files. A file that is not what it claims is an error naming it, unless
``skip_bad`` (then it is reported and left out).
"""

from __future__ import annotations

import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

from ...extras import require
from ..grid.cells import META
from ..grid.settings import primary_metric

FIELDS = ["model", "adapter", "method", "agents", "latent_steps", "agent_max_tokens", "max_gen_toks", "task", "metric",
          "value", "stderr", "n", "tokens_per_sample", "seconds_per_sample", "device", "date", "version", "config_hash",
          "source"]
EVALPLUS_TASKS = {"humaneval": "humanevalplus", "mbpp": "mbppplus"}


class BadResults(ValueError):
    """A results file that cannot be read as lm-eval's or EvalPlus's output."""


def _args(model_args) -> dict:
    if isinstance(model_args, dict):
        return {k: str(v) for k, v in model_args.items()}
    return dict(a.split("=", 1) for a in str(model_args or "").split(",") if "=" in a)


def infer_method(model: str, args: dict) -> str:
    if model == "hf":
        return "single-sft" if args.get("peft") else "single"
    if model == "diffmas":
        trained = bool(args.get("peft"))
        if args.get("topology") == "hierarchical":
            return "diffmas-hier" if trained else "latentmas-hier"
        if args.get("trace") == "stitch":
            if not trained:
                raise BadResults("an untrained stitched chain (diffmas trace=stitch without peft=) is no leaderboard "
                                 "method; name it: --from-results METHOD=PATH")
            return "stitchmas"
        return "diffmas" if trained else "latentmas"
    if model == "textmas":
        if args.get("peft"):
            return "single-sft" if args.get("agents") == "1" else "textmas-sft"
        return "single" if args.get("agents") == "1" else "textmas"
    raise BadResults(f"cannot tell the method of model {model!r}; name it: --from-results METHOD=PATH")


def _common(meta: dict, model: str, args: dict, method: str | None, source: Path) -> dict:
    config = meta.get("config", {})
    return {"model": config.get("model") or meta.get("model") or args.get("pretrained", ""),
            "adapter": meta.get("adapter", args.get("peft", "")),
            "method": meta.get("method") or method or infer_method(model, args),
            "agents": config.get("agents", args.get("agents", 1 if model == "hf" else "")),
            "latent_steps": config.get("latent_steps", args.get("latent_steps", 0 if model != "diffmas" else "")),
            "agent_max_tokens": config.get("agent_max_tokens", args.get("agent_max_tokens", "")),
            "version": meta.get("version", ""), "config_hash": meta.get("config_hash", ""), "source": str(source),
            "device": (meta.get("placement") or {}).get("device", "")}  # where it ran (Ray's placement)


def _r(x, digits: int = 4):
    return round(float(x), digits) if isinstance(x, (int, float)) and math.isfinite(x) else ""


def rows_from_lm_eval(results: dict, source: Path, method: str | None = None) -> list[dict]:
    """One row per task and metric of an lm-eval results JSON."""
    if not isinstance(results.get("results"), dict) or not isinstance(results.get("config"), dict):
        raise BadResults(f"{source}: not an lm-eval results JSON (no 'results'/'config')")
    config = results["config"]
    meta = results.get(META, {})
    args = _args(config.get("model_args", ""))
    common = _common(meta, str(config.get("model", "")), args, method, source)
    gen = config.get("gen_kwargs") or {}
    max_gen = meta.get("config", {}).get("max_gen_toks", gen.get("max_gen_toks", "") if isinstance(gen, dict) else "")
    date = meta.get("date") or (datetime.fromtimestamp(float(results["date"]), timezone.utc).strftime("%Y-%m-%d")
                                if isinstance(results.get("date"), (int, float)) else "")
    accounting = config.get("accounting", {}).get("per_task", {})
    rows = []
    for task, metrics in sorted(results["results"].items()):
        n = results.get("n-samples", {}).get(task, {}).get("effective", "")
        spent = accounting.get(task, {})
        tokens = meta.get("tokens_per_sample", spent.get("tokens_per_sample", ""))
        seconds = meta.get("seconds_per_sample", spent.get("seconds_per_sample", ""))
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name, filt = key.split(",", 1)
            metric = name if filt == "none" else f"{name},{filt}"  # e.g. exact_match,majority (k samples)
            rows.append({**common, "max_gen_toks": max_gen, "task": task, "metric": metric, "value": _r(value),
                         "stderr": _r(metrics.get(f"{name}_stderr,{filt}")), "n": n, "tokens_per_sample": tokens,
                         "seconds_per_sample": seconds, "date": date})
        stab = config.get("stability", {}).get("per_task", {}).get(task)
        if stab and stab.get("answers"):
            base = {**common, "max_gen_toks": max_gen, "task": task, "n": stab["answers"], "tokens_per_sample": tokens,
                    "seconds_per_sample": seconds, "date": date}
            for metric, key in STABILITY_METRICS.items():
                value = stab["stopped"]["length"] if key == "capped" else stab.get(key)
                rows.append({**base, "metric": metric, "value": _r(value, 6),
                             "stderr": _r(stab.get(f"{key}_stderr"), 6)})
    return rows


# the leaderboard's stability metrics (one row each per method x generative task) <- stability.summarise keys
STABILITY_METRICS = {"answer_perplexity": "perplexity", "answer_logprob": "mean_logprob",
                     "answer_entropy": "mean_entropy", "answer_capped": "capped"}


def curves(specs: list[str]) -> list[dict]:
    """The entropy-along-the-answer curves of the lm-eval results files: one row per method, task, position."""
    out = []
    for method, path in expand(specs):
        data = _read_json(path) or {}
        if "eval" in data or not isinstance(data.get("config"), dict):
            continue
        config = data["config"]
        meta = data.get(META, {})
        try:
            who = meta.get("method") or method or infer_method(str(config.get("model", "")),
                                                                _args(config.get("model_args", "")))
        except BadResults:
            continue
        for task, stab in config.get("stability", {}).get("per_task", {}).items():
            for t, (e, n) in enumerate(zip(stab.get("entropy_curve", []), stab.get("entropy_curve_n", []))):
                out.append({"method": who, "task": task, "position": t, "entropy": e, "n": n})
    return out


def items(specs: list[str]) -> list[dict]:
    """Every cell's per-item scores on its headline metric, one row per (cell, item): what a paired comparison of
    two methods on the same items needs, kept in the committed ``leaderboard_items.csv`` so the per-cell results
    files need not be. lm-eval files carry them in our metadata (``per_item``: cells the leaderboard scored; files
    made elsewhere have none), EvalPlus files per task (pass@1 of that task's samples). A cell seen twice is kept
    once."""

    out, seen = [], set()
    for method, path in expand(specs):
        data = _read_json(path) or {}
        try:
            scored = _item_scores(data, path, method)
        except BadResults:
            continue  # collect() reports a bad file (or skips it with --skip-bad); it has no items either way
        if scored is None:
            continue
        common, task, scores = scored
        key = (common["model"], common["method"], task)
        if key in seen:
            continue
        seen.add(key)
        out += [{"model": common["model"], "method": common["method"], "task": task, "metric": primary_metric(task),
                 "doc_id": doc, "score": _r(score, 6), "config_hash": common["config_hash"]}
                for doc, score in scores.items()]
    return out


def _item_scores(data: dict, path: Path, method: str | None) -> tuple[dict, str, dict[str, float]] | None:
    """(the cell's identifying fields, its task, doc id -> score) of one results file; None if it has no items."""
    if "eval" in data:

        runs = data["eval"]
        if not isinstance(runs, dict) or not runs:
            return None
        passed = require("evalplus.eval").PASS
        meta = _read_json(path.with_name(f"{META}.json")) or {}
        codegen = _read_json(path.with_name("codegen.json")) or {}
        if not (meta.get("method") or method or codegen.get("model")):
            return None
        common = _common(meta, str(codegen.get("model", "")), _args(codegen.get("model_args", {})), method, path)
        task = meta.get("task") or EVALPLUS_TASKS.get(codegen.get("dataset", ""), "humanevalplus")
        return common, task, {task_id: sum(x["base_status"] == x["plus_status"] == passed for x in r) / len(r)
                              for task_id, r in runs.items() if isinstance(r, list) and r}
    meta = data.get(META, {})
    config = data.get("config")
    if not meta.get("per_item") or not isinstance(config, dict) or not isinstance(data.get("results"), dict):
        return None
    common = _common(meta, str(config.get("model", "")), _args(config.get("model_args", "")), method, path)
    task = meta.get("task") or next(iter(data["results"]), "")
    return common, task, meta["per_item"]


def rows_from_evalplus(results: dict, source: Path, method: str | None = None) -> list[dict]:
    """pass@1 (base tests; base + plus tests) of an EvalPlus ``*_eval_results.json`` (greedy: one sample per task).

    The stderr is lm-eval's for a mean, sqrt(p (1 - p) / (n - 1)), so it compares with the other columns.
    Method and model come from ``leaderboard.json``/``codegen.json`` beside it when ``diffmas-eval codegen`` made it.
    """

    PASS = require("evalplus.eval").PASS  # noqa: N806 (EvalPlus's name)
    runs = results.get("eval")
    if not isinstance(runs, dict) or not runs or not all(isinstance(v, list) and v for v in runs.values()):
        raise BadResults(f"{source}: not an EvalPlus results file (no per-task 'eval' lists)")
    try:
        base = [sum(x["base_status"] == PASS for x in r) / len(r) for r in runs.values()]
        plus = [sum(x["base_status"] == x["plus_status"] == PASS for x in r) / len(r) for r in runs.values()]
    except (KeyError, TypeError) as err:
        raise BadResults(f"{source}: EvalPlus results without base/plus status ({err})") from None
    meta = _read_json(source.with_name(f"{META}.json")) or {}
    codegen = _read_json(source.with_name("codegen.json")) or {}
    if not (meta.get("method") or method or codegen.get("model")):
        raise BadResults(f"{source}: no codegen.json beside it to tell its method; name it: --from-results "
                         f"METHOD={source}")
    args = _args(codegen.get("model_args", {}))
    common = _common(meta, str(codegen.get("model", "")), args, method, source)
    dataset = meta.get("task") or EVALPLUS_TASKS.get(codegen.get("dataset", ""), "humanevalplus")
    date = meta.get("date") or str(results.get("date", ""))[:10].replace("_", "-")
    n = len(runs)
    rows = []
    for metric, values in (("pass@1", plus), ("pass@1_base", base)):
        p = sum(values) / n
        stderr = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else ""
        rows.append({**common, "max_gen_toks": meta.get("max_gen_toks", codegen.get("max_new_tokens", "")),
                     "task": dataset, "metric": metric, "value": _r(p), "stderr": _r(stderr), "n": n,
                     "tokens_per_sample": meta.get("tokens_per_sample", ""),
                     "seconds_per_sample": meta.get("seconds_per_sample", ""), "date": date})
    return rows


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadResults(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise BadResults(f"{path}: a JSON {type(data).__name__}, not an object")
    return data


def read_file(path: Path, method: str | None = None) -> list[dict]:
    """Rows of one results file: EvalPlus's if it has per-task 'eval', else lm-eval's."""
    data = _read_json(path)
    if data is None:
        raise BadResults(f"{path}: no such file")
    if "eval" in data:
        return rows_from_evalplus(data, path, method)
    return rows_from_lm_eval(data, path, method)


def expand(specs: list[str]) -> list[tuple[str | None, Path]]:
    """``[METHOD=]PATH`` items; a directory stands for the lm-eval and EvalPlus results files under it."""
    out = []
    for spec in specs:
        method, sep, path = spec.partition("=")
        if not sep:
            method, path = None, spec
        p = Path(path)
        if p.is_dir():
            files = sorted({*p.rglob("results*.json"), *p.rglob("*eval_results.json")})
            out += [(method, f) for f in files]
        else:
            out.append((method, p))
    return out


def collect(specs: list[str], skip_bad: bool = False) -> list[dict]:
    """Rows of every file, one per cell; conflicting values for a cell are an error naming both files."""
    seen: dict[tuple, dict] = {}
    for method, path in expand(specs):
        try:
            rows = read_file(path, method)
        except BadResults as err:
            if not skip_bad:
                raise ValueError(f"{err} (pass --skip-bad to go on without it)") from None
            print(f"skipping {err}", file=sys.stderr)
            continue
        for row in rows:
            key = (row["model"], row["method"], row["task"], row["metric"])
            old = seen.get(key)
            if old is None:
                seen[key] = row
            elif (old["value"], old["n"]) != (row["value"], row["n"]):
                raise ValueError(f"two results for {' / '.join(map(str, key))}: {old['value']} (n={old['n']}) in "
                                 f"{old['source']} and {row['value']} (n={row['n']}) in {row['source']}; "
                                 "keep one of them")
    return list(seen.values())
