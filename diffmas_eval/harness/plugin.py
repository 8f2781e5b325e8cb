"""Make the plain ``lm_eval`` CLI find the ``diffmas`` and ``textmas`` models and this package's tasks.

lm-eval 0.4.13 reads no plugin entry points (later versions read ``lm_eval.models``, which
pyproject.toml also declares). The package therefore ships a ``.pth`` file that calls
``install()`` at interpreter start. ``install`` imports nothing heavy: it waits, through an import
hook, for lm-eval's own modules to load, and only then
- registers lazy placeholders for our models (only after lm-eval's own mapping is in, since
  ``get_model`` loads the built-in models only while the registry is empty), and
- adds our task directory to every ``TaskManager`` that includes lm-eval's default tasks, and
- adds each sample's accounting record (tokens per agent, wall time; from ``diffmas``/``textmas``)
  to the sample log that ``EvaluationTracker.save_results_samples`` writes (``--log_samples``).
"""

from __future__ import annotations

import importlib.abc
import sys
from pathlib import Path

MODELS = {
    "diffmas": "diffmas_eval.harness.diffmas_lm:DiffMASLM",
    "textmas": "diffmas_eval.harness.textmas_lm:TextMASLM",
}


def _tasks_dir() -> Path:
    """The task YAMLs: inside an installed wheel (``diffmas_eval/lm_eval_tasks``, see pyproject.toml's
    force-include), else the checkout's top-level ``tasks/`` (editable install, PYTHONPATH)."""
    package = Path(__file__).resolve().parent.parent
    shipped = package / "lm_eval_tasks"
    return shipped if shipped.is_dir() else package.parent / "tasks"


TASKS_DIR = _tasks_dir()


def _register_models(module) -> None:
    from lm_eval.api.registry import model_registry  # start-up time: the .pth hook runs at interpreter start

    for name, target in MODELS.items():
        if name not in model_registry:
            model_registry.register(name, target=target)


def _add_task_dir(module) -> None:
    manager = module.TaskManager
    if getattr(manager.__init__, "_diffmas", False):
        return
    original = manager.__init__

    def __init__(self, *args, include_path=None, include_defaults=True, **kwargs):
        if include_defaults:
            paths = [] if include_path is None else (
                list(include_path) if isinstance(include_path, (list, tuple)) else [include_path])
            # ours first: a user's include_path still overrides (later paths win in lm-eval's index)
            include_path = [str(TASKS_DIR), *[p for p in paths if str(p) != str(TASKS_DIR)]]
        original(self, *args, include_path=include_path, include_defaults=include_defaults, **kwargs)

    __init__._diffmas = True
    manager.__init__ = __init__


def _log_accounting(module) -> None:
    tracker = module.EvaluationTracker
    if getattr(tracker.save_results_samples, "_diffmas", False):
        return
    original = tracker.save_results_samples

    def save_results_samples(self, task_name, samples):
        source = getattr(getattr(self, "general_config_tracker", None), "model_source", None)
        if source is None or source in MODELS:  # only runs of our models carry accounting
            from .common import add_accounting  # start-up time: the .pth hook; common imports lm_eval

            add_accounting(task_name, samples)
        return original(self, task_name, samples)

    save_results_samples._diffmas = True
    tracker.save_results_samples = save_results_samples


HOOKS = {"lm_eval.models": _register_models, "lm_eval.tasks.manager": _add_task_dir,
         "lm_eval.loggers.evaluation_tracker": _log_accounting}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Run a hook right after a watched module has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in HOOKS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_hook(module):
            exec_module(module)
            HOOKS[fullname](module)

        loader.exec_module = exec_then_hook
        return spec


def install() -> None:
    if any(isinstance(f, _AfterImport) for f in sys.meta_path):
        return
    for name, hook in HOOKS.items():  # already imported (plugin installed late): hook now
        if name in sys.modules:
            hook(sys.modules[name])
    sys.meta_path.insert(0, _AfterImport())
