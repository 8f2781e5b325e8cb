"""Does SFT through the chain help? DiffMAS LoRA SFT vs single-agent LoRA SFT, same data and steps.

Runs the user-facing commands (``diffmas-eval sft-data``, ``accelerate launch trainers/sft.py``,
``lm_eval``) and prints held-out accuracy before and after training, for both:

    python benchmarks/sft_experiment.py --family commonsense --steps 100 --limit 150

Held-out items: the SFT set takes the last rows of each file and lm-eval's --limit the first, so
they never overlap (``sft-data`` prints the bound). Everything lands in --workdir; finished steps
are skipped when the script is run again (an interrupted experiment resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from diffmas_eval import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TASKS = {"commonsense": "diffmas_commonsense_qa", "math": "diffmas_gsm8k"}


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}); see {log}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--family", default="commonsense", choices=sorted(TASKS))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--latent-steps", type=int, default=4)
    p.add_argument("--limit", type=int, default=150, help="held-out items evaluated")
    p.add_argument("--workdir", default="runs/sft_experiment")
    args = p.parse_args()
    work = (REPO / args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"{args.family}_sft.jsonl"
    if not data.exists():
        run([str(BIN / "diffmas-eval"), "sft-data", "--family", args.family, "--out", str(data)], work / "data.log")
    task = TASKS[args.family]
    runs = {"single": 1, "diffmas": args.agents}
    for name, agents in runs.items():
        out = work / f"adapter_{name}"
        if not (out / "diffmas.json").exists():
            run([str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", "trainers/sft.py",
                 "--model_name_or_path", args.model, "--dataset_name", str(data), "--use_peft",
                 "--agents", str(agents), "--latent_steps", str(args.latent_steps), "--max_steps", str(args.steps),
                 "--per_device_train_batch_size", str(args.batch_size), "--learning_rate", str(args.lr),
                 "--lr_scheduler_type", "constant", "--logging_steps", "10", "--save_strategy", "no",
                 "--seed", "0", "--report_to", "none", "--output_dir", str(out)], work / f"train_{name}.log")
    rows = []
    for name, agents in runs.items():
        for trained in (False, True):
            model_args = f"pretrained={args.model},agents={agents},latent_steps={args.latent_steps}"
            if trained:
                model_args += f",peft={work / f'adapter_{name}'}"
            tag = f"{name}_{'trained' if trained else 'base'}"
            out = work / f"eval_{tag}"
            if not list(out.rglob("results_*.json")):
                run([str(BIN / "lm_eval"), "--model", "diffmas", "--model_args", model_args, "--tasks", task,
                     "--limit", str(args.limit), "--batch_size", "8", "--device", "cpu", "--seed", "0",
                     "--output_path", str(out)], work / f"{tag}.log")
            result = json.loads(next(out.rglob("results_*.json")).read_text())["results"][task]
            rows.append((name, trained, result))
    metric = "acc" if args.family == "commonsense" else "exact_match"
    print(f"\n{task}, first {args.limit} items (held out), {args.steps} steps x batch {args.batch_size}, "
          f"lr {args.lr}, LoRA r=8; diffmas: {args.agents} agents, latent_steps={args.latent_steps}")
    print("| method | before SFT | after SFT | change |\n|---|---|---|---|")
    for name in runs:
        before, after = (r[2][f"{metric},none"] for r in rows if r[0] == name)
        print(f"| {name} | {before:.3f} | {after:.3f} | {after - before:+.3f} |")


if __name__ == "__main__":
    os.environ.setdefault("DIFFMAS_DATA_DIR", str((REPO.parent / "shared" / "data").resolve()))
    main()
