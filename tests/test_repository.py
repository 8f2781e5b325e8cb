"""What the repository holds: the results people read (CSVs with per-item scores, tables, charts) under
leaderboards/, and none of what makes them (per-cell results files, caches, wheels), which .gitignore keeps out."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import pytest

from diffmas_eval.leaderboard.ablate import AblationOptions
from diffmas_eval.leaderboard.cli import add_ablate_parser, add_leaderboard_parser

ROOT = Path(__file__).resolve().parents[1]
SUMMARIES = ["leaderboards/leaderboard.csv", "leaderboards/leaderboard_items.csv", "leaderboards/leaderboard.md",
             "leaderboards/entropy_curve.csv", "leaderboards/accuracy.png", "leaderboards/codegen/table.md",
             "leaderboards/ablations/ablations.csv", "leaderboards/ablations/ablation_items.csv",
             "leaderboards/ablations/gradients.csv", "leaderboards/ablations/ablations.json",
             "leaderboards/ablations/ablations.md", "leaderboards/ablations/ablation_latent_steps.png"]
IGNORED = ["leaderboards/runs/", "leaderboards/cache/", "leaderboards/codegen/*/*/", "leaderboards/ablations/runs/",
           "leaderboards/ablations/cache/", "*.whl", "/data/"]


def _rows(path: str) -> list[dict]:
    with open(ROOT / path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_summaries_are_committed_and_the_runs_are_not():
    assert [p for p in SUMMARIES if not (ROOT / p).is_file()] == []
    ignore = (ROOT / ".gitignore").read_text().splitlines()
    assert [p for p in IGNORED if p not in ignore] == []


def test_both_commands_publish_under_leaderboards():
    assert AblationOptions().output == "leaderboards/ablations/ablations.csv"
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_leaderboard_parser(sub)
    add_ablate_parser(sub)
    assert parser.parse_args(["leaderboard"]).output == "leaderboards/leaderboard.csv"
    assert parser.parse_args(["ablate"]).output == "leaderboards/ablations/ablations.csv"


def test_committed_per_item_scores_agree_with_the_leaderboard():
    """Every cell in leaderboard_items.csv averages to its row of leaderboard.csv (same hash, same n)."""
    rows = {(r["model"], r["method"], r["task"], r["metric"]): r for r in _rows("leaderboards/leaderboard.csv")}
    cells: dict[tuple, list[dict]] = {}
    for item in _rows("leaderboards/leaderboard_items.csv"):
        cells.setdefault((item["model"], item["method"], item["task"], item["metric"]), []).append(item)
    assert cells, "leaderboard_items.csv is empty"
    for key, items in cells.items():
        row = rows[key]
        assert {i["config_hash"] for i in items} == {row["config_hash"]} and len(items) == int(row["n"])
        assert sum(float(i["score"]) for i in items) / len(items) == pytest.approx(float(row["value"]), abs=1e-4)
