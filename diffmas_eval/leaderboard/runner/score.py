"""Scoring one method x task cell: lm-eval's ``simple_evaluate`` for the lm-eval tasks, ``diffmas-eval
codegen`` (its Python API, scored by EvalPlus) for HumanEval+.

A cell's results file is written once the cell is done and named by the hash of its settings, so a
rerun skips it; lm-eval's request cache (per cell) makes an interrupted cell resume. Each results file
is the tool's own (lm-eval's results JSON; EvalPlus's ``*_eval_results.json``) plus our metadata (the
``leaderboard`` key; ``leaderboard.json`` beside the EvalPlus run), so the collector reads them the same
way as results made anywhere else.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import AutoTokenizer

from ... import __version__
from ...codegen.cli import run_codegen
from ...tasks.protocol import SAMPLED_TASKS, task_config
from ...tasks.registry import CODE_TASKS
from ..grid.cells import META, code_dir, lm_eval_path
from ..grid.settings import Settings, method_model_args, primary_metric, short_hash
from .scheduler import placement


def metadata(settings: Settings, method: str, task: str, adapter: Path | None, seconds: float) -> dict:
    """The cell's settings (hashed) and where and when it ran (``placement``, ``started``/``ended``: not
    hashed, so the same cell run anywhere is the same cell)."""

    spec, ended = settings.cell(method, task), time.time()
    return {"method": method, "task": task, "config_hash": short_hash(spec), "config": spec,
            # how its answers were decoded: "in_process", or the server's backend, vLLM version and arguments
            "decoding": spec.get("serving") or {"backend": "in_process"},
            "adapter": str(adapter) if adapter else "", "seconds": round(seconds, 1), "placement": placement(),
            "started": round(ended - seconds, 2), "ended": round(ended, 2),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "version": __version__}


def spread(model_args: str, device: str) -> str:
    """A cell given two or more GPUs (``--gpus-per-cell 2``) shards its model over them (``parallelize=True``: a
    ``device_map`` over the visible GPUs, which are the ones Ray assigned); not part of the cell's hash."""

    if device.startswith("cuda") and torch.cuda.device_count() > 1 and "parallelize=" not in model_args:
        return model_args + ",parallelize=True"
    return model_args


def _generated_tokens(samples: list[dict], pretrained: str) -> float:
    """Mean generated tokens per sample, from lm-eval's logged responses (for models without accounting)."""

    texts = [r[0] for s in samples for r in s.get("resps", []) if r and isinstance(r[0], str)]
    if not texts:  # log-likelihood requests generate nothing
        return 0.0
    tok = AutoTokenizer.from_pretrained(pretrained)
    return round(sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts) / len(samples), 2)


def per_item(samples: list[dict], metric: str) -> dict[str, float]:
    """doc_id -> the item's score on ``metric`` (mean over its samples): what a paired comparison of two cells on
    the same items needs (``ablate``), kept in our metadata since the lm-eval samples are not stored."""
    scores: dict[str, list[float]] = {}
    for s in samples:
        value = s.get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scores.setdefault(str(s.get("doc_id")), []).append(float(value))
    return {k: sum(v) / len(v) for k, v in scores.items()}


def score_lm_eval(settings: Settings, method: str, task: str, adapter: Path | None, runs: Path, cache: Path,
                  batch_size: int | str, device: str, served=None) -> Path:
    from lm_eval import simple_evaluate  # start-up time: lm_eval builds its task index at import

    model, model_args = method_model_args(method, settings.model, settings.agents, settings.latent_steps,
                                          settings.agent_max_tokens, settings.textmas_args,
                                          str(adapter) if adapter else None, settings.chain, served,
                                          settings.seed if served else None)
    model_args = spread(model_args, device)

    path = lm_eval_path(runs, settings, method, task)
    limit, cap, protocol = settings.limit_of(task), settings.answer_cap(task), settings.decoding()
    # k > 1: the task with lm-eval repeats, filters and consistency metrics; a log-likelihood task is scored once
    spec = task_config(task, protocol, cap) if protocol.samples == 1 or task in SAMPLED_TASKS else task
    gen_kwargs = ({"max_gen_toks": cap} if protocol.name == "greedy" and not protocol.do_sample
                  else None if isinstance(spec, dict) else protocol.generation(task, cap))
    print(f"   lm_eval --model {model} --model_args {model_args} --tasks {task} --limit {limit} "
          f"(protocol {protocol.name}: {protocol.generation(task, cap)}, {protocol.samples} sample(s))", flush=True)
    t0 = time.perf_counter()
    seed = settings.seed
    results = simple_evaluate(
        model=model, model_args=model_args, tasks=[spec], limit=limit or None, batch_size=batch_size,
        device=device, apply_chat_template=settings.chat_template, gen_kwargs=gen_kwargs,
        use_cache=str(cache / "lm_eval" / path.stem / method), log_samples=True, random_seed=seed,
        numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    seconds = time.perf_counter() - t0
    samples = results.pop("samples", {}).get(task, [])
    meta = metadata(settings, method, task, adapter, seconds)
    spent = results.get("config", {}).get("accounting", {}).get("per_task", {}).get(task, {})
    n = max(1, len({s.get("doc_id") for s in samples}))
    if "tokens_per_sample" in spent:
        meta.update(tokens_per_sample=spent["tokens_per_sample"], seconds_per_sample=spent["seconds_per_sample"])
    else:  # lm-eval's hf: count what it generated; time per sample includes loading the model
        pretrained = model_args.split(",")[0].split("=", 1)[1]
        meta.update(tokens_per_sample=_generated_tokens(samples, pretrained),
                    seconds_per_sample=round(seconds / n, 3))
    meta["per_item"] = per_item(samples, primary_metric(task))
    results[META] = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(path)
    return path


def score_code(settings: Settings, method: str, task: str, adapter: Path | None, runs: Path,
               batch_size: int | str, device: str, served=None) -> Path:
    """HumanEval+ through ``diffmas-eval codegen --evaluate`` (resumable: it appends samples per batch)."""

    model, model_args = method_model_args(method, settings.model, settings.agents, settings.latent_steps,
                                          settings.agent_max_tokens, settings.textmas_args,
                                          str(adapter) if adapter else None, served=served,
                                          seed=settings.seed if served else None)
    model_args = spread(model_args, device)
    out = code_dir(runs, settings, method, task)
    limit, cap, protocol = settings.limit_of(task), settings.answer_cap(task), settings.decoding()
    temperature = protocol.temperature if protocol.do_sample else 0.0
    print(f"   diffmas-eval codegen --model {model} --model_args {model_args} --dataset {CODE_TASKS[task]} "
          f"--limit {limit} --max-new-tokens {cap} --n-samples {protocol.samples} --temperature {temperature} "
          "--evaluate", flush=True)
    t0 = time.perf_counter()
    run = run_codegen(model, model_args, CODE_TASKS[task], out=out.parent.parent, name=out.name,
                      limit=limit or None, n_samples=protocol.samples, temperature=temperature, max_new_tokens=cap,
                      batch_size=batch_size if isinstance(batch_size, int) else 1, device=device, seed=settings.seed,
                      evaluate=True)
    meta = metadata(settings, method, task, adapter, time.perf_counter() - t0)
    acc = run.summary.get("accounting", {})
    meta.update(tokens_per_sample=acc.get("tokens_per_sample", ""),
                seconds_per_sample=acc.get("seconds_per_sample", ""), model=settings.model, max_gen_toks=cap)
    tmp = out / f"{META}.json.tmp"  # whole or absent, as every results file: a reader never sees half of it
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    tmp.replace(out / f"{META}.json")
    return out / "samples_eval_results.json"


def score(settings: Settings, method: str, task: str, runs: Path, work: Path, batch_size: int | str, device: str,
          adapter: Path | None = None, served=None) -> Path:
    """One cell, whichever scorer its task needs: EvalPlus for the code tasks, lm-eval for the rest; ``served``: the
    server its decoding goes to (``serve.Served``; None: in process)."""
    if served is not None and not settings.served(method, task):
        raise ValueError(f"{method} x {task} is not a served cell ({settings.serving or 'no --serve'}); its hash "
                         "would not say how it was decoded")
    if task in CODE_TASKS:
        return score_code(settings, method, task, adapter, runs, batch_size, device, served)
    return score_lm_eval(settings, method, task, adapter, runs, work, batch_size, device, served)
