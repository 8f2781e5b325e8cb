"""Paired comparisons of leaderboard methods (issue 34, item 4): per task, item by item, from the per-item scores."""

import shutil
from pathlib import Path

import pytest

from diffmas_eval.commands.cli import main
from diffmas_eval.leaderboard.results import compare, sections, tables

ROOT = Path(__file__).resolve().parents[1]


def items(method, scores, task="diffmas_arc_challenge", digest=None):
    return [{"model": "m", "method": method, "task": task, "metric": "acc", "doc_id": str(i), "score": s,
             "config_hash": digest or f"h-{method}"} for i, s in enumerate(scores)]


def test_pairs_are_each_method_against_single_and_the_trained_against_their_twins():
    assert compare.pairs(["diffmas", "single", "latentmas", "single-sft", "textmas-sft", "textmas"]) == [
        ("single-sft", "single"), ("textmas", "single"), ("latentmas", "single"), ("diffmas", "single"),
        ("textmas-sft", "single"), ("diffmas", "latentmas"), ("diffmas", "single-sft"), ("textmas-sft", "textmas")]
    assert compare.pairs(["diffmas", "latentmas"]) == [("diffmas", "latentmas")]  # no single: only the twins


def test_a_paired_difference_is_beyond_noise_only_when_its_interval_excludes_zero():
    rows = compare.comparisons(items("single", [0, 1] * 20) + items("diffmas", [1, 1] * 20)
                               + items("latentmas", [1, 0] * 20))
    by = {(r["method"], r["reference"]): r for r in rows}
    gain = by["diffmas", "single"]  # +1 on half the items, 0 on the rest
    assert gain["items"] == 40 and gain["delta"] == 0.5 and 0 < gain["ci_low"] < 0.5 < gain["ci_high"]
    assert gain["beyond_noise"] and gain["beyond_noise_bonferroni"] and gain["comparisons"] == 3
    same = by["latentmas", "single"]  # +1 and -1 in equal numbers: no difference on average
    assert same["delta"] == 0 and same["ci_low"] < 0 < same["ci_high"] and not same["beyond_noise"]
    assert "diffmas | single | 40 | +0.50" in compare.table(rows)


def test_methods_scored_on_different_items_are_refused_naming_both_cells_and_the_items():
    rows = items("single", [0, 1, 1]) + items("diffmas", [1, 1])[:1] + [
        {**items("diffmas", [0])[0], "doc_id": "7"}]
    with pytest.raises(ValueError) as err:
        compare.comparisons(rows)
    message = str(err.value)
    assert "h-diffmas" in message and "h-single" in message
    assert "only diffmas: 7" in message and "only single: 1, 2" in message


def test_the_committed_items_give_the_table_and_comparisons_csv(tmp_path):
    """`--readme` recomputes the comparisons from leaderboard_items.csv alone and puts them in the section."""
    for name in ("leaderboard.csv", "leaderboard_items.csv"):
        shutil.copy(ROOT / "leaderboards" / name, tmp_path / name)
    doc = tmp_path / "page.md"
    doc.write_text(f"{sections.README_START}\n{sections.README_END}\n")
    assert main(["leaderboard", "--readme", str(doc), "--output", str(tmp_path / "leaderboard.csv")]) == 0
    written = tables.read_csv(tmp_path / compare.FILE)
    tasks = {r["task"] for r in written}
    assert tasks and tasks <= {r["task"] for r in tables.read_csv(tmp_path / "leaderboard_items.csv")}
    assert {(r["method"], r["reference"]) for r in written} >= {("diffmas", "single"), ("diffmas", "latentmas"),
                                                                 ("diffmas", "single-sft")}
    assert "| task | metric | method | vs | items |" in doc.read_text()
