"""The package's layout is a contract: the committed results are keyed by hashes that a reorganisation must not move.

Every cell of the committed leaderboard and ablations is stored under ``short_hash`` of the settings that made it;
a refactor that changed what a ``Settings`` hashes would silently orphan every cached cell and adapter users have.
These tests rebuild the settings from the documented commands (``make leaderboard``, ``make ablations`` with their
defaults) and recompute every committed ``config_hash``.
"""

from __future__ import annotations

import ast
import csv
import shlex
import subprocess
from pathlib import Path

import pytest

from diffmas_eval.commands.cli import build_parser
from diffmas_eval.leaderboard.ablate import AblationOptions, base_settings, cells_of
from diffmas_eval.leaderboard.cli import settings_of
from diffmas_eval.leaderboard.grid.settings import short_hash
from diffmas_eval.leaderboard.results import compare, training_records
from diffmas_eval.leaderboard.results.charts import charts
from diffmas_eval.leaderboard.results.markdown import document
from diffmas_eval.leaderboard.results.tables import read_csv

ROOT = Path(__file__).resolve().parents[1]


def documented_argv(target: str, command: str) -> list[str]:
    """The ``diffmas-eval COMMAND ...`` arguments that ``make -n TARGET`` expands to, with the Makefile's defaults."""
    lines = subprocess.run(["make", "-n", target, "VENV=.venv", "DATA_DIR="], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout
    line = next(x for x in lines.replace("\\\n", " ").split("\n") if f"diffmas-eval {command} " in x)
    words = shlex.split(line)
    return words[words.index(command):]


def test_every_committed_leaderboard_hash_is_what_the_code_computes():
    settings = settings_of(build_parser().parse_args(documented_argv("leaderboard", "leaderboard")))
    rows = list(csv.DictReader(open(ROOT / "leaderboards" / "leaderboard.csv")))
    assert rows
    assert {(r["method"], r["task"], short_hash(settings.cell(r["method"], r["task"]))) for r in rows} == {
        (r["method"], r["task"], r["config_hash"]) for r in rows}


def test_every_committed_ablation_hash_is_what_the_code_computes():
    opts = AblationOptions()
    computed = {short_hash(s.cell(v.method, opts.task)) for v, _, s in cells_of(opts, base_settings(opts))}
    committed = {r["config_hash"] for r in csv.DictReader(open(ROOT / "leaderboards" / "ablations" / "ablations.csv"))}
    assert committed and committed <= computed


def _modules() -> dict[str, ast.Module]:
    package = ROOT / "diffmas_eval"
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): ast.parse(p.read_text())
            for p in package.rglob("*.py")}


def test_no_module_imports_another_modules_private_name():
    """A private name is its module's own business: importing one across modules (``report._save`` once) is how
    files grew into each other; what two modules share is public."""
    private = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("diffmas_eval")):
                private += [f"{name}: {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert not private


def test_imports_sit_at_the_top_of_modules():
    """A module's top says what it depends on. Function-local imports are kept for optional extras and start-up
    time only (each says which), at most a fifth of all imports: more, and a circle can hide behind them."""
    total = local = 0
    unexplained = []
    for name, tree in _modules().items():
        lines = (ROOT / (name.replace(".", "/") + ".py")).read_text().splitlines()
        inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                total += 1
                if id(node) in inside:
                    local += 1
                    if name.startswith("diffmas_eval.leaderboard") and "#" not in lines[node.end_lineno - 1]:
                        unexplained.append(f"{name}:{node.lineno}")
    assert local <= total / 5, f"{local} of {total} imports inside functions"
    assert not unexplained, "function-local imports without a reason (optional extra or start-up time)"


def test_the_committed_leaderboard_page_and_charts_regenerate_byte_for_byte(tmp_path):
    """``leaderboards/`` is a function of its CSVs: the page and every chart come back identical from them."""
    pytest.importorskip("matplotlib")
    out = ROOT / "leaderboards"
    rows = read_csv(out / "leaderboard.csv")
    paired = compare.comparisons(compare.read_items(out))
    trained, losses = training_records.read(out)
    assert "# Leaderboard\n\n" + document(rows, "", paired, trained) == (out / "leaderboard.md").read_text()
    drawn = charts(rows, tmp_path, paired, losses)
    assert drawn
    for path in drawn:
        assert path.read_bytes() == (out / path.name).read_bytes(), path.name


def test_the_public_imports_keep_working():
    """What users import (docs/usage.md and the names the package's pages promise) survives any reorganisation."""
    import importlib

    promised = {"diffmas_eval.latent": ["AgentChain", "LatentConfig", "LatentTrace"],
                "diffmas_eval.latent.realign": [], "diffmas_eval.prompts": [], "diffmas_eval.testing.tiny": [],
                "diffmas_eval.models": ["load_model", "prepare_tokenizer", "resolve_pretrained"],
                "diffmas_eval.memory": ["trace_memory"], "diffmas_eval.harness.diffmas_lm": ["DiffMASLM"],
                "diffmas_eval.training.trainer": ["DiffMASSFTTrainer"]}
    usage = (ROOT / "docs" / "usage.md").read_text()
    for line in usage.splitlines():
        words = line.split("#")[0].split()
        if len(words) >= 4 and words[0] == "from" and words[1].startswith("diffmas_eval") and words[2] == "import":
            promised.setdefault(words[1], []).extend(w.strip(",") for w in words[3:])
    assert "diffmas_eval.leaderboard.ablate" in promised  # the usage page was read
    for module, names in promised.items():
        loaded = importlib.import_module(module)
        assert all(hasattr(loaded, n) for n in names), (module, names)
