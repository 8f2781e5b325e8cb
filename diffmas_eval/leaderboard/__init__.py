"""``diffmas-eval leaderboard``: every method (single, single-sft, textmas, latentmas, diffmas) trained and scored
on the same items of every task; a tidy CSV, a Markdown table, charts, and README's results section.

``config`` (methods, tasks, hashes) · ``train`` (SFT sets, adapters via ``accelerate launch trainers/sft.py``) ·
``cells`` (one method x task through lm-eval or ``diffmas-eval codegen``) · ``collect`` (results files made
anywhere into rows) · ``report`` (CSV, Markdown, charts, README) · ``run`` (the leaderboard as a function,
``run_leaderboard``) · ``cli`` (its flags only) · ``scheduler`` (the jobs as Ray tasks) ·
``ablate_grid`` / ``ablate`` / ``ablate_report`` (``diffmas-eval ablate``: the paper's ablation grid as cells of the
same kind: the grid, its runner, its report; the runner imports both, the report only the grid).
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
