"""``diffmas-eval leaderboard``: every method (single, single-sft, textmas, latentmas, diffmas) trained and scored
on the same items of every task; a tidy CSV, a Markdown table, charts, and README's results section.

Three rooms, one per question: ``grid`` (what to run: methods, tasks, settings and their hashes, trainings, the
ablation grid, the plan), ``runner`` (running it: Ray, placement, the vLLM server, one cell, one training) and
``results`` (what it shows: collecting, statistics, tables, charts, the generated doc sections). Above them
``run`` (``run_leaderboard``), ``ablate`` (``run_ablation``: the same machinery over the ablation grid) and ``cli``
(the flags of both commands).
"""

from pathlib import Path

from .cli import add_leaderboard_parser
from .grid.settings import METHODS, Settings, method_model_args
from .results.collect import FIELDS, collect, rows_from_lm_eval
from .run import RunOptions, run_leaderboard


def rows_from_results(results: dict, method: str, seconds: float | None = None) -> list[dict]:
    """Rows of one lm-eval results JSON for ``method`` (kept for callers of the first leaderboard)."""

    return rows_from_lm_eval(results, Path("<memory>"), method)


__all__ = ["FIELDS", "METHODS", "RunOptions", "Settings", "add_leaderboard_parser", "collect", "method_model_args",
           "rows_from_results", "run_leaderboard"]
