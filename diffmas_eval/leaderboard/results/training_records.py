"""The adapters a leaderboard's trained cells used: what each was trained on, for how long, and how its loss went.

A trained method's score means little without knowing that training happened: a 4-step adapter and an untrained
chain score alike. The cells' results name their adapter; each adapter's directory holds its ``diffmas.json``
(the recipe as it ran, first and last loss) and ``loss.csv`` (the curve), but the adapters live in the work
directory, outside git. So ``publish`` copies what a reader needs into two small files beside the leaderboard's
CSV, ``training.csv`` (one row per adapter) and ``training_loss.csv`` (every logged step), from which the tables
and the loss chart are regenerated without the adapters.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..grid.trainings import MARKER

FILE, CURVES_FILE = "training.csv", "training_loss.csv"
FIELDS = ["adapter", "method", "family", "agents", "latent_steps", "steps", "batch_size", "accumulation",
          "sft_format", "learning_rate", "lora_r", "seed", "loss_first", "loss_last", "loss_steps"]
LOSS_FIELDS = ["adapter", "method", "family", "step", "loss"]


def records(adapter_dirs: list[str]) -> tuple[list[dict], list[dict]]:
    """(one row per adapter, one row per logged loss) for the adapter directories that exist here; an adapter
    trained elsewhere (``--from-results``) is left out rather than guessed."""
    from ...training.trainer import LOSS_FILE  # start-up time: the trainer module imports TRL (seconds)


    rows, losses = [], []
    for name in sorted(set(adapter_dirs)):
        path = Path(name)
        marker, config = path / MARKER, path / "diffmas.json"
        if not (marker.exists() and config.exists()):
            continue
        spec = json.loads(marker.read_text())["training"]
        record = json.loads(config.read_text()).get("training", {})
        row = {"adapter": path.name, "method": path.name.rsplit("-", 2)[0], "family": spec["family"],
               "agents": spec["agents"], "latent_steps": spec["latent_steps"],
               "steps": record.get("global_step", spec.get("steps")), "batch_size": spec["batch_size"],
               "accumulation": spec.get("accumulation", 1), "sft_format": spec.get("sft_format", "plain"),
               "learning_rate": spec["learning_rate"], "lora_r": spec["lora_r"], "seed": spec["seed"],
               **{f"loss_{k}": record.get(f"loss_{k}", "") for k in ("first", "last", "steps")}}
        rows.append(row)
        curve = path / LOSS_FILE
        if curve.exists():
            with open(curve, newline="") as f:
                losses += [{"adapter": path.name, "method": row["method"], "family": row["family"],
                            "step": r["step"], "loss": r["loss"]} for r in csv.DictReader(f)]
    return rows, losses


def write(rows: list[dict], losses: list[dict], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, fields, data in ((FILE, FIELDS, rows), (CURVES_FILE, LOSS_FIELDS, losses)):
        tmp = directory / (name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(data)
        tmp.replace(directory / name)


def read(directory: Path) -> tuple[list[dict], list[dict]]:
    """``write``'s two files beside a leaderboard's CSV (no rows for a file that is not there)."""
    out = []
    for name in (FILE, CURVES_FILE):
        path = Path(directory) / name
        if not path.exists():
            out.append([])
            continue
        with open(path, newline="") as f:
            out.append(list(csv.DictReader(f)))
    return out[0], out[1]




def budgets(rows: list[dict]) -> str:
    """'100 x 4 (commonsense), 4 x 1 (code, math)': the training budget per family, for a one-line summary."""
    per: dict[str, set[str]] = {}
    for r in rows:
        per.setdefault(f"{r['steps']} x {r['batch_size']}", set()).add(r["family"])
    return ", ".join(f"{b} ({', '.join(sorted(f))})" for b, f in sorted(per.items(), key=lambda kv: -len(kv[0])))


