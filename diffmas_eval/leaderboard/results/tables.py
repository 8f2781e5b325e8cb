"""The leaderboard's tidy CSV files, written atomically and read back, and the queries every view of them shares
(which rows are primary, which methods and tasks they hold, in what order).
"""

from __future__ import annotations

import csv
from pathlib import Path

from ...tasks.registry import TASKS
from ..grid.settings import METHODS, primary_metric
from .collect import FIELDS

CURVE_FIELDS = ["method", "task", "position", "entropy", "n"]


ITEM_FIELDS = ["model", "method", "task", "metric", "doc_id", "score", "config_hash"]


def write_atomically(rows: list[dict], path: Path, fields: list[str]) -> None:
    """``rows`` as a CSV at ``path``, through a temporary file: an interrupted write leaves the old file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def write_csv(rows: list[dict], path: Path) -> None:
    write_atomically(sorted(rows, key=_order), path, FIELDS)


def write_curves(rows: list[dict], path: Path) -> None:
    """entropy_curve.csv: mean token entropy at each answer position, per method and task (and how many answers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (_order({**r, "metric": ""}), int(r["position"]))))


def write_items(rows: list[dict], path: Path) -> None:
    """leaderboard_items.csv: each cell's score on each item (``collect.items``), in the table's order."""
    write_atomically(sorted(rows, key=lambda r: (_order(r), r["model"], _doc_order(str(r["doc_id"])))), path,
                      ITEM_FIELDS)


def _doc_order(doc_id: str) -> tuple:
    """lm-eval's doc ids are integers, EvalPlus's ``HumanEval/12``: numeric order within either."""
    head, _, tail = doc_id.rpartition("/")
    return (head, int(tail)) if tail.isdigit() else (head, -1, tail)


def read_csv(path: Path, command: str = "diffmas-eval leaderboard") -> list[dict]:
    """The rows of a CSV that ``command`` writes (the error says to run it)."""
    if not path.exists():
        raise ValueError(f"{path} does not exist; run `{command}` first (or pass --output)")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _order(row: dict) -> tuple:
    method = row["method"]
    return (METHODS.index(method) if method in METHODS else len(METHODS), method, row["task"], row["metric"])


def as_float(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def primary(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """(method, task) -> the row of the task's headline metric."""
    return {(r["method"], r["task"]): r for r in rows if r["metric"] == primary_metric(r["task"])}


def methods_and_tasks(rows: list[dict]) -> tuple[list[str], list[str]]:
    methods = sorted({r["method"] for r in rows}, key=lambda m: _order({"method": m, "task": "", "metric": ""}))
    tasks = list(dict.fromkeys(r["task"] for r in sorted(rows, key=lambda r: r["task"])))
    return methods, tasks


def choice_tasks(tasks: list[str]) -> list[str]:
    """The multiple-choice tasks among ``tasks``: the registry's, and any other lm-eval task scored by ``acc``."""

    return [t for t in tasks if (TASKS[t].kind == "multiple_choice" if t in TASKS else primary_metric(t) == "acc")]
