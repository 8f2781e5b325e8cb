"""lm-eval's private parts that the package uses, checked on lm-eval 0.4.13 (``CHECKED``: >=0.4.13,<0.5).

``load_task_yaml``: a task's YAML as lm-eval reads it (``include:`` merged, ``!function`` tags resolved), without
loading the task's data. 0.4.13 has no public function for that (``lm_eval.utils.load_yaml_config`` went away with
the task-manager rewrite); its own ``TaskManager`` uses ``lm_eval.tasks._yaml_loader.load_yaml``.
"""

from __future__ import annotations

from pathlib import Path

from lm_eval.tasks._yaml_loader import load_yaml

LIBRARY = "lm-eval"
CHECKED = ">=0.4.13,<0.5"


def load_task_yaml(path: str | Path) -> dict:
    """The task config at ``path``: its includes merged, its ``!function`` tags imported."""
    return load_yaml(path, resolve_func=True)
