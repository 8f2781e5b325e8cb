"""Where each cell's results live, named by the hash of exactly the settings that determine it, so a rerun finds a
finished cell and skips it; the collector and the ablations' report read the same paths.
"""

from __future__ import annotations

from pathlib import Path

from ...tasks.registry import CODE_TASKS
from .settings import Settings, short_hash

META = "leaderboard"


def lm_eval_path(runs: Path, settings: Settings, method: str, task: str) -> Path:
    return runs / method / f"results_{task}_{short_hash(settings.cell(method, task))}.json"


def code_dir(runs: Path, settings: Settings, method: str, task: str) -> Path:
    return runs / "evalplus" / CODE_TASKS[task] / f"{method}-{short_hash(settings.cell(method, task))}"


def result_path(runs: Path, settings: Settings, method: str, task: str) -> Path:
    """The file the collector reads for this cell (it exists once the cell is finished)."""
    if task in CODE_TASKS:
        return code_dir(runs, settings, method, task) / "samples_eval_results.json"
    return lm_eval_path(runs, settings, method, task)


def done(runs: Path, settings: Settings, method: str, task: str) -> bool:
    if task in CODE_TASKS:
        return (code_dir(runs, settings, method, task) / f"{META}.json").exists()
    return result_path(runs, settings, method, task).exists()
