"""Training cost: ``DiffMASSFTTrainer`` against TRL's plain ``SFTTrainer`` on the same examples.

What is measured (ratios from one run of this script; absolute numbers on a shared machine are noise):

- **seconds per step** (median over the steps after the first, which warms up) and **peak memory**
  of LoRA (r 8, alpha 16, as ``trainers/sft.py``) SFT on the same prompt/completion rows (the
  shortest of the last 50 GSM8K rows that ``diffmas-eval sft-data --family math`` builds from
  ``DIFFMAS_DATA_DIR``), for TRL's ``SFTTrainer`` (one model, no chain) and ``DiffMASSFTTrainer``
  with 1..6 agents, each with and without checkpointing. ``gradient_checkpointing=True`` is TRL's
  model-level checkpointing for ``SFTTrainer``; ``DiffMASSFTTrainer`` turns it into per-agent
  checkpointing (``checkpoint_agents``: each upstream agent's forward is recomputed in backward),
  because the model-level one would drop the KV cache and cut the latent trace.
- Each configuration runs in its own subprocess, so one's memory never counts in another's. Peak
  memory is what ``trainer.train()`` adds over the same process once the model is loaded, LoRA
  attached and the rows tokenized (the trainer built): on CPU the high-water mark of resident
  memory (``getrusage(RUSAGE_SELF).ru_maxrss``; reset before training through
  ``/proc/self/clear_refs`` where Linux allows it, else the built process's mark is subtracted),
  on GPU ``torch.cuda.max_memory_allocated`` over ``memory_allocated`` before training.
- ``x SFT`` columns divide by ``SFTTrainer`` with the same checkpointing setting. The fit is peak
  memory against agents (least squares; slope in MiB per agent and R^2). The issue's target: with
  checkpointing, memory is linear in agents (R^2 near 1; the slope is what one more agent costs:
  its trace segment and the saved inputs of its checkpointed forward).

    DIFFMAS_DATA_DIR=/work/shared/data python benchmarks/training.py --json training.json

Small defaults (batch 1, 3 steps, 2 latent steps, short rows) keep the 14 configurations within
minutes on a CPU; on the bundled model 6 agents with checkpointing is the longest by far.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from diffmas_eval import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]


def reset_peak() -> bool:
    """Reset the kernel's resident-memory high-water mark of this process (Linux ``clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def worker(args) -> dict:
    """One configuration in this process: load, note the memory baseline, train, measure."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import ModelConfig, SFTConfig, SFTTrainer, get_peft_config

    from diffmas_eval.latent import LatentConfig
    from diffmas_eval.models import prepare_tokenizer, resolve_pretrained
    from diffmas_eval.training.trainer import DiffMASSFTTrainer

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    method, agents, ckpt = args.one[0], int(args.one[1]), args.one[2] == "on"
    path = resolve_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
    model.to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prepare_tokenizer(tokenizer)
    dataset = load_dataset("json", data_files=args.data)["train"]
    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                           learning_rate=1e-4, lr_scheduler_type="constant", gradient_checkpointing=ckpt,
                           max_length=args.max_length, logging_steps=args.steps, save_strategy="no",
                           report_to="none", seed=0, disable_tqdm=True, use_cpu=not cuda, bf16=False,
                           dataloader_num_workers=0)
        peft = get_peft_config(ModelConfig(use_peft=True, lora_r=8, lora_alpha=16))
        kwargs = dict(args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft,
                      callbacks=[timer])
        if method == "sft":
            trainer = SFTTrainer(model, **kwargs)
        else:
            chain = LatentConfig.from_dict({"agents": agents, "latent_steps": args.latent_steps})
            trainer = DiffMASSFTTrainer(model, diffmas_config=chain, **kwargs)
        # the baseline: model loaded, LoRA attached, rows tokenized; what train() adds is the result
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base, reset = torch.cuda.memory_allocated(), True
        else:
            reset = reset_peak()
            base = peak_kib() * 1024
        trainer.train()
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_kib() * 1024 - base
    timed = timer.times[1:] or timer.times
    return {"method": method, "agents": agents, "checkpointing": ckpt, "steps": len(timer.times),
            "s_per_step": statistics.median(timed), "step_times": timer.times, "peak_mib": peak / 2**20,
            "peak_reset": reset}


def fit(xs: list[float], ys: list[float]) -> dict:
    """Least-squares line ``y = slope * x + intercept`` and its R^2."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - slope * x - intercept) ** 2 for x, y in zip(xs, ys))
    return {"slope": slope, "intercept": intercept, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def pick_rows(out: Path, n: int) -> None:
    """The ``n`` shortest of the last ``max(n, 50)`` GSM8K SFT rows (``diffmas-eval sft-data --family math``):
    short rows keep the sweep within minutes on a CPU, and every configuration trains on the same ones."""
    from diffmas_eval.training.data import build

    build("math", out, n=max(n, 50))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    rows = sorted(rows, key=lambda r: len(r["prompt"]) + len(r["completion"]))[:n]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_one(args, method: str, agents: int, ckpt: bool, data: Path, work: Path) -> dict:
    out = work / f"{method}_{agents}_{'on' if ckpt else 'off'}.json"
    cmd = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--latent-steps", str(args.latent_steps),
           "--max-length", str(args.max_length), "--threads", str(args.threads), "--device", args.device,
           "--dtype", args.dtype, "--data", str(data), "--one", method, str(agents), "on" if ckpt else "off",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        sys.exit(f"{method} agents={agents} checkpointing={ckpt} failed ({proc.returncode}):\n"
                 f"{proc.stderr[-4000:]}\ncommand: {' '.join(cmd)}")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local path or bundled:NAME")
    p.add_argument("--agents", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    p.add_argument("--checkpointing", choices=["off", "on"], nargs="+", default=["off", "on"])
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration (the first warms up)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rows", type=int, default=0, help="SFT rows, the shortest GSM8K ones (default: steps x batch)")
    p.add_argument("--latent-steps", type=int, default=2, help="latent steps per upstream agent")
    p.add_argument("--max-length", type=int, default=512, help="SFTConfig.max_length")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", metavar="OUT", help="write every number here (rewritten after each configuration)")
    p.add_argument("--data", help=argparse.SUPPRESS)  # worker: the SFT rows
    p.add_argument("--one", nargs=3, metavar=("METHOD", "AGENTS", "CKPT"), help=argparse.SUPPRESS)  # worker
    args = p.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        Path(args.json).write_text(json.dumps(worker(args)))
        return
    os.environ.setdefault("DIFFMAS_DATA_DIR", str((REPO.parent / "shared" / "data").resolve()))
    from tqdm import tqdm

    configs = [("sft", 1, ckpt == "on") for ckpt in args.checkpointing]
    configs += [("diffmas", a, ckpt == "on") for ckpt in args.checkpointing for a in args.agents]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "math_sft.jsonl"
        pick_rows(data, args.rows or args.steps * args.batch_size)
        for method, agents, ckpt in tqdm(configs, desc="training configurations", unit="config"):
            rows.append(run_one(args, method, agents, ckpt, data, work))
            tqdm.write(f"{method} agents={agents} checkpointing={ckpt}: {rows[-1]['s_per_step']:.3f} s/step, "
                       f"peak {rows[-1]['peak_mib']:.0f} MiB", file=sys.stderr)
            if args.json:
                Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    fits = summarize(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "fits": fits}, indent=2))
        print(f"\nwrote {args.json}")


def summarize(rows: list[dict], args) -> dict:
    """Ratios to SFTTrainer with the same checkpointing, the Markdown table, and the memory fits."""
    sft = {r["checkpointing"]: r for r in rows if r["method"] == "sft"}
    where = "cuda max_memory_allocated" if args.device == "cuda" else "CPU peak RSS"
    print(f"\nLoRA r 8 SFT, {args.steps} steps x batch {args.batch_size} (first step not timed), short GSM8K rows; "
          f"model {args.model} ({args.dtype}, {args.device}); diffmas latent_steps={args.latent_steps}; "
          f"peak = {where} (what train() adds); ratios from this run only\n")
    print("| trainer | agents | checkpointing | s / step | x SFT | peak MiB | x SFT |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = sft.get(r["checkpointing"])
        r["time_x_sft"] = r["s_per_step"] / base["s_per_step"] if base else None
        r["memory_x_sft"] = r["peak_mib"] / base["peak_mib"] if base and base["peak_mib"] > 0 else None
        ts, mem = (f"{x:.2f}" if x is not None else "-" for x in (r["time_x_sft"], r["memory_x_sft"]))
        name = "SFTTrainer (TRL)" if r["method"] == "sft" else "DiffMASSFTTrainer"
        print(f"| {name} | {r['agents']} | {'on' if r['checkpointing'] else 'off'} | {r['s_per_step']:.3f} | {ts} "
              f"| {r['peak_mib']:.0f} | {mem} |")
    fits = {}
    print("\nPeak memory against agents (least squares):\n")
    print("| checkpointing | MiB per agent | intercept MiB | R^2 |")
    print("|---|---|---|---|")
    for ckpt in (False, True):
        points = [(r["agents"], r["peak_mib"]) for r in rows if r["method"] == "diffmas" and r["checkpointing"] == ckpt]
        if len({a for a, _ in points}) < 2:
            continue
        f = fits["on" if ckpt else "off"] = fit(*map(list, zip(*points)))
        print(f"| {'on' if ckpt else 'off'} | {f['slope']:.1f} | {f['intercept']:.0f} | {f['r2']:.3f} |")
    return fits


if __name__ == "__main__":
    main()
