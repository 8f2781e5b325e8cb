"""Scoring is EvalPlus's own: ``evalplus.evaluate`` in a subprocess (its sandbox, its time limits).

EvalPlus caches results beside the samples (``samples_eval_results.json``) and, when that file exists,
either reuses it silently (stale once samples were added) or, with ``--i-just-wanna-run``, asks Y/N on
stdin. Neither is acceptable unattended, so before running we keep a results file only if it scored
exactly these samples against exactly this dataset file, and move any other one aside (``.bak``, as
EvalPlus does); the subprocess's stdin is closed, so nothing can ever wait on it.

The subprocess runs EvalPlus's own command-line entry point (``evalplus.evaluate:main``, the same
arguments as the printed command) and then exits at once: ``evaluate`` leaves a non-daemon watchdog
thread sleeping in 20-second steps, which would otherwise hold every run open for up to 20 s more.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

from ..extras import locate, require
from .data import Dataset

RUNNER = ("import os, sys; from evalplus.evaluate import main; sys.argv[0] = 'evalplus.evaluate'; main(); "
          "sys.stdout.flush(); sys.stderr.flush(); os._exit(0)")


def results_path(samples: Path) -> Path:
    return samples.with_name(samples.name.replace(".jsonl", "_eval_results.json"))


def command(dataset: Dataset, samples: Path, parallel: int | None = None, min_time_limit: float | None = None,
            gt_time_limit_factor: float | None = None) -> tuple[list[str], dict[str, str]]:
    """``evalplus.evaluate`` arguments, and the environment variables it needs (the dataset override)."""
    args = ["evalplus.evaluate", "--dataset", dataset.name, "--samples", str(samples)]
    for flag, value in (("--parallel", parallel), ("--min-time-limit", min_time_limit),
                        ("--gt-time-limit-factor", gt_time_limit_factor)):
        if value is not None:
            args += [flag, str(value)]
    env = {dataset.variable: str(dataset.path)} if dataset.overridden else {}
    return args, env


def shell_line(args: list[str], env: dict[str, str]) -> str:
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, args)])


def _solutions(samples: Path) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    return sorted((r["task_id"], r["solution"]) for r in rows)


def clear_stale_results(dataset: Dataset, samples: Path) -> Path | None:
    """Move a results file aside unless it scored these samples on this dataset file; return where to."""
    path = results_path(samples)
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
        scored = sorted((r["task_id"], r["solution"]) for rs in old["eval"].values() for r in rs)
        wanted = {t for t, _ in _solutions(samples)} & {json.loads(x)["task_id"] for x in dataset.lines}
        fresh = (old.get("hash") == hashlib.md5(dataset.path.read_bytes()).hexdigest()
                 and scored == [s for s in _solutions(samples) if s[0] in wanted])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        fresh = False
    if fresh:
        return None
    backup = path.with_name(path.name + ".bak")
    while backup.exists():
        backup = backup.with_name(backup.name + ".bak")
    path.rename(backup)
    return backup


def pass_at_1(results: dict) -> dict[str, float]:
    """pass@1 (base tests; base + plus tests) from an EvalPlus results file, as EvalPlus computes it."""
    require("evalplus")
    from evalplus.eval import PASS, estimate_pass_at_k  # optional extra: codegen

    runs = list(results["eval"].values())
    total = np.array([len(r) for r in runs])
    base = np.array([sum(x["base_status"] == PASS for x in r) for r in runs])
    plus = np.array([sum(x["base_status"] == x["plus_status"] == PASS for x in r) for r in runs])
    return {"base": float(estimate_pass_at_k(total, base, 1).mean()),
            "plus": float(estimate_pass_at_k(total, plus, 1).mean()), "tasks": len(runs)}


def run(dataset: Dataset, samples: Path, parallel: int | None = None, min_time_limit: float | None = None,
        gt_time_limit_factor: float | None = None) -> dict[str, float]:
    """Run ``evalplus.evaluate`` on ``samples`` (stdin closed); return pass@1 base and plus."""
    backup = clear_stale_results(dataset, samples)
    if backup is not None:
        print(f"moved stale results aside: {backup}", file=sys.stderr)
    args, env = command(dataset, samples, parallel, min_time_limit, gt_time_limit_factor)
    locate("evalplus")  # a missing extra as our error, not a traceback from the subprocess
    argv = [sys.executable, "-c", RUNNER, *args[1:]]
    proc = subprocess.run(argv, env={**os.environ, **env}, stdin=subprocess.DEVNULL)
    path = results_path(samples)
    if proc.returncode != 0 or not path.exists():
        raise RuntimeError(f"evalplus.evaluate failed (exit {proc.returncode}): {shell_line(args, env)}")
    return pass_at_1(json.loads(path.read_text()))
