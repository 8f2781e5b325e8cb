"""``diffmas-eval codegen``: EvalPlus generation as a function (``run_codegen``) and the command line over it,
and the results table."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import DEFAULT_MODEL
from ..extras import locate
from ..harness.plugin import install
from ..models import resolve_pretrained
from . import evaluate as evalplus
from .data import configure_offline, load_dataset
from .samples import SampleDir, summarise_accounting

MAS_MODELS = ("diffmas", "textmas")  # models with agent roles: they get the code-family roles
SECRET_ARGS = ("api_key",)
# where a server is and how it is asked (a leaderboard's vLLM restarts on another port): not part of what the samples
# depend on, so a run resumes against the same server anywhere
CONNECTION_ARGS = ("base_url", "timeout", "max_retries", "num_concurrent")


def add_codegen_parser(sub) -> None:
    p = sub.add_parser("codegen", help="HumanEval+/MBPP+ samples from an lm-eval model, scored by EvalPlus",
                       description="Generate EvalPlus samples with an lm-eval model (hf, diffmas, textmas, ...) "
                                   "and print (or run, --evaluate) the evalplus.evaluate command that scores them.")
    p.add_argument("--model", required=True, help="lm-eval model name: hf, diffmas, textmas, ...")
    p.add_argument("--model_args", "--model-args", default="",
                   help=f"as for lm_eval, e.g. pretrained={DEFAULT_MODEL},agents=4")
    p.add_argument("--dataset", required=True, choices=["humaneval", "mbpp"])
    p.add_argument("--limit", type=int, default=None, help="only the first N tasks (writes a subset dataset file)")
    p.add_argument("--n-samples", type=int, default=1, help="samples per task (default 1: greedy)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples, top_p 0.95")
    p.add_argument("--max-new-tokens", type=int, default=768, help="per sample (default: EvalPlus's 768)")
    p.add_argument("--batch-size", type=int, default=1, help="requests per generate_until call (default 1)")
    p.add_argument("--device", default=None, help="as lm_eval --device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="samples go to OUT/<dataset>/<name>/samples.jsonl")
    p.add_argument("--name", default=None, help="the run's directory name (default: a slug of model and options)")
    p.add_argument("--evaluate", action="store_true", help="run evalplus.evaluate and print pass@1 (base, plus)")
    p.add_argument("--parallel", type=int, default=None, help="evalplus.evaluate --parallel")
    p.add_argument("--min-time-limit", type=float, default=None, help="evalplus.evaluate --min-time-limit")
    p.add_argument("--gt-time-limit-factor", type=float, default=None,
                   help="evalplus.evaluate --gt-time-limit-factor")
    p.set_defaults(func=codegen)

    t = sub.add_parser("codegen-table", help="Markdown table of pass@1 from codegen runs (their summary.json)")
    t.add_argument("out", help="the --out directory of the runs")
    t.set_defaults(func=table)


def redact(model_args: dict) -> dict:
    return {k: ("***" if k in SECRET_ARGS else v) for k, v in model_args.items()}


def slug(model: str, model_args: dict, n_samples: int, temperature: float, max_new_tokens: int) -> str:
    args = "_".join(f"{k}-{v}" for k, v in redact(model_args).items())
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{model}_{args}").strip("-_")
    text = f"{text}_n{n_samples}_t{temperature:g}_tok{max_new_tokens}"
    if len(text) > 120:
        text = f"{text[:100]}_{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    return text


def _model_class(name: str):
    install()  # registers diffmas/textmas with lm-eval's registry
    from lm_eval.api.registry import get_model  # start-up time: lm_eval (diffmas-eval --help)

    try:
        return get_model(name)
    except ValueError:
        raise ValueError(f"unknown model {name!r}: use hf, diffmas, textmas or another lm-eval model name "
                         "(lm_eval --model ...)") from None


@dataclass
class CodegenRun:
    """What one ``run_codegen`` left behind: where its files are, and its ``summary.json`` as a dict."""

    dir: Path  # OUT/<dataset>/<name>: samples.jsonl, accounting.jsonl, codegen.json, summary.json, the subset file
    summary: dict  # as written to summary.json: the config, tasks, accounting, the evalplus command, pass@1

    @property
    def samples(self) -> Path:
        return Path(self.summary["samples"])

    @property
    def command(self) -> str:
        """The ``evalplus.evaluate`` shell line that scores the samples (with its dataset override)."""
        return self.summary["command"]

    @property
    def pass_at_1(self) -> dict | None:
        """``{"base", "plus", "tasks"}`` when the run was evaluated, else None."""
        return self.summary.get("pass@1")


def run_codegen(model: str, model_args: str | Mapping[str, Any], dataset: str, *, out: str | Path,
                limit: int | None = None, n_samples: int = 1, temperature: float = 0.0, max_new_tokens: int = 768,
                batch_size: int = 1, device: str | None = None, seed: int = 0, name: str | None = None,
                evaluate: bool = False, parallel: int | None = None, min_time_limit: float | None = None,
                gt_time_limit_factor: float | None = None,
                log: Callable[[str], object] | None = print) -> CodegenRun:
    """EvalPlus samples of ``dataset`` (humaneval | mbpp) from the lm-eval model ``model``: ``diffmas-eval
    codegen`` as a function, so that the leaderboard and user scripts run exactly what the command runs.

    ``model_args``: lm-eval's ``k=v,...`` text, or the dict it parses to. Samples go to
    ``out/<dataset>/<name>/samples.jsonl`` (``name`` defaults to a slug of model and options) and a rerun
    generates only what is missing. ``evaluate``: run ``evalplus.evaluate`` (``parallel``, ``min_time_limit``,
    ``gt_time_limit_factor`` are its options) and put pass@1 into the summary. ``log`` gets the progress
    lines the command prints (the evalplus command line before it runs, pass@1 after); None keeps quiet.
    """
    locate("evalplus")  # the missing extra before any generation
    configure_offline()  # before anything imports evalplus (it reads the overrides at import)
    from lm_eval.utils import simple_parse_args_string  # start-up time: lm_eval (diffmas-eval --help)

    say = log or (lambda line: None)
    if n_samples < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError("--n-samples, --batch-size and --max-new-tokens must be >= 1")
    if temperature < 0 or (n_samples > 1 and temperature == 0):
        raise ValueError("--n-samples > 1 needs --temperature > 0 (greedy decoding gives the same sample each time)")
    model_cls = _model_class(model)
    data = load_dataset(dataset)
    if limit is not None and not 1 <= limit <= len(data.lines):
        raise ValueError(f"--limit {limit} is out of range: {data.name} ({data.path}) has "
                         f"{len(data.lines)} tasks; use 1..{len(data.lines)} or drop --limit")
    user_args = simple_parse_args_string(model_args) if isinstance(model_args, str) else dict(model_args)
    config = {"model": model, "model_args": redact({k: v for k, v in user_args.items() if k not in CONNECTION_ARGS}),
              "dataset": dataset,
              "dataset_sha256": data.sha256, "n_samples": n_samples, "temperature": temperature,
              "max_new_tokens": max_new_tokens, "seed": seed, "prompt": "evalplus-instruct"}
    if model in MAS_MODELS:
        config["family"] = user_args.get("family", "code")
    name = name or slug(model, user_args, n_samples, temperature, max_new_tokens)
    run = SampleDir(Path(out) / dataset / name)
    run.check_config(config)

    tasks = data.tasks()[:limit]
    counts = run.counts()
    need = {t["task_id"]: max(0, n_samples - counts[t["task_id"]]) for t in tasks}
    if any(need.values()):
        lm = _build(model_cls, model, user_args, batch_size, device, seed)
        run.open(config)
        from .generate import generate  # start-up time: lm_eval (diffmas-eval --help)

        skipped = sum(1 for v in need.values() if v == 0)
        if skipped:
            say(f"resuming: {skipped} of {len(tasks)} tasks already have their samples")
        generate(lm, dataset, tasks, need, run, batch_size, max_new_tokens, temperature, model)
    else:
        say(f"all {len(tasks)} tasks already have their samples in {run.samples}")

    subset = data.subset(limit, run.dir)
    cmd, env = evalplus.command(subset, run.samples, parallel, min_time_limit, gt_time_limit_factor)
    line = evalplus.shell_line(cmd, env)
    summary = {"samples": str(run.samples), "command": line, "tasks": len(tasks), **config,
               "accounting": summarise_accounting(run.accounting_records())}
    say(f"samples: {run.samples}")
    say(f"accounting (tokens per agent, seconds per sample): {run.accounting}")
    say(line)
    if evaluate:
        summary["pass@1"] = evalplus.run(subset, run.samples, parallel, min_time_limit, gt_time_limit_factor)
        p = summary["pass@1"]
        say(f"pass@1 {dataset} (base tests): {p['base']:.3f}   {dataset}+ (base + plus tests): "
            f"{p['plus']:.3f}   ({p['tasks']} tasks)")
    (run.dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return CodegenRun(run.dir, summary)


def codegen(args: argparse.Namespace) -> int:
    """The ``codegen`` command: its flags, one for one, as ``run_codegen``'s arguments."""
    run_codegen(args.model, args.model_args, args.dataset, out=args.out, limit=args.limit, n_samples=args.n_samples,
                temperature=args.temperature, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                device=args.device, seed=args.seed, name=args.name, evaluate=args.evaluate, parallel=args.parallel,
                min_time_limit=args.min_time_limit, gt_time_limit_factor=args.gt_time_limit_factor)
    return 0


def _build(model_cls, model: str, user_args: dict, batch_size: int, device: str | None, seed: int):
    """The lm-eval model, as ``lm_eval --model MODEL --model_args ... --batch_size B --device D`` builds it."""
    from transformers import set_seed  # start-up time: transformers.set_seed imports peft and bitsandbytes

    model_args = dict(user_args)
    if model in MAS_MODELS:  # code-family roles for the agents (the final agent writes the program)
        model_args.setdefault("family", "code")
    elif str(model_args.get("pretrained", "")).startswith("bundled:"):  # diffmas/textmas resolve it themselves
        model_args["pretrained"] = resolve_pretrained(model_args["pretrained"])
    set_seed(seed)
    extra = {"batch_size": batch_size, "device": device or ("cuda" if torch.cuda.is_available() else "cpu")}
    extra = {k: v for k, v in extra.items() if k not in model_args}  # model_args win, as with lm_eval
    return model_cls.create_from_arg_obj(model_args, extra)


def table(args: argparse.Namespace) -> int:
    """pass@1 per run, from the ``summary.json`` that ``codegen --evaluate`` leaves beside each run's samples."""
    rows = []
    for path in sorted(Path(args.out).glob("*/*/summary.json")):
        s = json.loads(path.read_text())
        if "pass@1" not in s:
            continue
        acc = s.get("accounting", {})
        rows.append(f"| {s['model']} | {s['dataset']} | {s['pass@1']['tasks']} | {s['pass@1']['base']:.3f} "
                    f"| {s['pass@1']['plus']:.3f} | {acc.get('tokens_per_sample', '')} "
                    f"| {acc.get('seconds_per_sample', '')} |")
    if not rows:
        raise ValueError(f"no evaluated runs under {args.out} (run codegen with --evaluate first)")
    print("| method | dataset | tasks | pass@1 base | pass@1 plus | tokens/sample | s/sample |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0
