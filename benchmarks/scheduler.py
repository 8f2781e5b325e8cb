"""The leaderboard's jobs on Ray against the process pool they replaced, and a simulated 8-GPU schedule.

1. ``--grid``: a reduced leaderboard (three cells and one short training on the tiny model) run twice on this
   machine, each in a fresh output directory: once by this checkout (Ray, ``--jobs 2 --threads 1``), once by the
   previous version's process pool (``--baseline-src``: a checkout of the commit before Ray, e.g.
   ``git archive b5b53d7 | tar -x -C /tmp/before``). Printed: both wall times and their ratio. Ray's cost is its
   start (a local instance per run) and a fresh worker per GPU task.
2. ``--simulate``: the default leaderboard's jobs (every method x task of ``--csv``, the trained methods' adapters
   first) as Ray tasks on 8 declared GPUs, each sleeping for its measured duration (seconds per sample x n from the
   CSV; a training: ``--train-seconds``), scaled by ``--scale``. Printed: the makespan against total work / 8 and
   against the critical path (the longest training plus its longest cell).

    python benchmarks/scheduler.py --grid --baseline-src /tmp/before --simulate --out benchmarks/results/scheduler.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRID = ["--methods", "single,latentmas,diffmas", "--tasks", "diffmas_arc_challenge", "--limit", "2", "--agents", "2",
        "--latent-steps", "2", "--max-gen-toks", "8", "--train-steps", "2", "--train-batch-size", "1",
        "--train-max-length", "2048", "--sft-examples", "commonsense=4", "--batch-size", "2", "--jobs", "2",
        "--threads", "1"]
TRAINED = ("single-sft", "diffmas", "textmas-sft", "stitchmas", "diffmas-hier")


def run_grid(src: Path, model: Path, out: Path) -> float:
    """Wall seconds of the reduced leaderboard run by the package at ``src`` (its own interpreter, fresh dirs)."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "diffmas_eval.commands.cli", "leaderboard", "--model", str(model), *GRID,
           "--output", str(out / "leaderboard.csv")]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=out.parent)
    return time.perf_counter() - t0


def grid(baseline: Path, repeats: int) -> dict:
    from diffmas_eval.testing.tiny import save_tiny_model

    here = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_model(Path(tmp) / "tiny", "llama")
        times: dict[str, list[float]] = {"ray": [], "pool": []}
        for k in range(repeats):  # alternated, so a neighbour's load falls on both alike
            for name, src in (("pool", baseline), ("ray", here)):
                times[name].append(run_grid(src, model, Path(tmp) / f"{name}-{k}"))
                print(f"grid {name} run {k + 1}: {times[name][-1]:.1f} s", flush=True)
    ray_s, pool_s = min(times["ray"]), min(times["pool"])
    return {"grid": " ".join(GRID), "ray_seconds": times["ray"], "pool_seconds": times["pool"],
            "ratio_ray_over_pool": round(ray_s / pool_s, 3)}


def _sleep(seconds: float, adapter=None) -> float:
    time.sleep(seconds)
    return seconds


def simulate(csv_path: Path, scale: float, train_seconds: float, gpus: int) -> dict:
    import ray

    from diffmas_eval.leaderboard.grid.settings import FAMILY
    from diffmas_eval.leaderboard.runner.scheduler import Job, Resources, run_jobs, start_local

    cells: dict[tuple[str, str], float] = {}
    with open(csv_path, newline="") as f:
        for r in csv.DictReader(f):
            try:
                cells[r["method"], r["task"]] = float(r["seconds_per_sample"]) * int(r["n"]) * scale
            except (ValueError, KeyError):
                continue
    adapters = sorted({(m, FAMILY[t]) for m, t in cells if m in TRAINED and t in FAMILY})
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        jobs = [Job(f"train {m} ({f})", _sleep, (train_seconds * scale,), logs / f"train-{m}-{f}.log", kind="train")
                for m, f in adapters]
        for (m, t), s in sorted(cells.items(), key=lambda c: -c[1]):
            after = f"train {m} ({FAMILY[t]})" if m in TRAINED and t in FAMILY else None
            jobs.append(Job(f"{m} x {t}", _sleep, (s,), logs / f"{m}-{t}.log", after))
        start_local(num_gpus=gpus, num_cpus=gpus + 2)
        try:
            t0 = time.perf_counter()
            run_jobs(jobs, Resources())
            makespan = time.perf_counter() - t0
        finally:
            ray.shutdown()
    work = sum(cells.values()) + train_seconds * scale * len(adapters)
    critical = max([train_seconds * scale + max(s for (m2, t), s in cells.items() if m2 == m and FAMILY.get(t) == f)
                    for m, f in adapters] + [max(cells.values())])
    bound = max(work / gpus, critical)
    return {"csv": str(csv_path), "gpus": gpus, "jobs": len(jobs), "scale": scale, "work_seconds": round(work, 1),
            "work_over_gpus": round(work / gpus, 1), "critical_path": round(critical, 1),
            "makespan": round(makespan, 1), "makespan_over_bound": round(makespan / bound, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", action="store_true")
    p.add_argument("--baseline-src", type=Path, help="a checkout of the version with the process pool")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--simulate", action="store_true")
    p.add_argument("--csv", type=Path, default=Path("leaderboards/leaderboard.csv"))
    p.add_argument("--scale", type=float, default=0.02, help="simulated seconds per measured second")
    p.add_argument("--train-seconds", type=float, default=300.0, help="one adapter training, measured seconds")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    result: dict = {}
    if args.grid:
        if args.baseline_src is None:
            p.error("--grid needs --baseline-src")
        result["grid"] = grid(args.baseline_src.resolve(), args.repeats)
    if args.simulate:
        result["simulate"] = simulate(args.csv, args.scale, args.train_seconds, args.gpus)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
