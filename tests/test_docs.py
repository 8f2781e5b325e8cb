"""The docs are tested like code: README.md and docs/ (the mkdocs site).

- ``mkdocs build --strict`` builds the site with no broken link or anchor;
- every generated section equals what its command writes now (a stale one fails naming the command);
- every fenced shell block that calls ``diffmas-eval``, ``lm_eval --model diffmas|textmas``,
  ``accelerate launch trainers/sft.py`` (or ``-m lm_eval``) or ``make`` is parsed by the real parsers: each flag
  exists, each choice is valid, each diffmas/textmas model_arg is one the model takes, each Makefile target and
  variable exists, and a file a command reads is written by an earlier line of the block or is in the repository;
- every Python block compiles and its imports resolve.

``check_block`` is the checker; the negative tests show what it flags (the README's old training example, which
built ``data/commonsense_sft.jsonl`` and trained on ``data/math_sft.jsonl``, among them).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
OPERATORS = {"&&", "||", ";", "|", "&"}
# flags whose value a command writes (so a later line may read it)
WRITES = {"--out", "--output", "--output_dir", "--output_path", "--out-dir", "--json-out", "--site-dir"}


def fenced_blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, body, line number of the opening fence) of every ``` block."""
    blocks, lang, body, start = [], None, [], 0
    for i, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if lang is None and stripped.startswith("```"):
            lang, body, start = stripped[3:].strip().lower() or "text", [], i
        elif lang is not None and stripped.startswith("```"):
            blocks.append((lang, "\n".join(body), start))
            lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def commands(body: str) -> list[list[str]]:
    """The simple commands of a shell block: continuation lines joined, comments dropped, split at ``&&``,
    ``;``, ``|``, ``&``; a redirection ``> FILE`` stays in the command's words."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        cmd: list[str] = []
        for w in words:
            tail = w[-1:] if len(w) > 1 and w[-1] in ";&" and not w.endswith("&&") else ""
            w = w[:-1] if tail else w
            if w in OPERATORS:
                out.append(cmd)
                cmd = []
                continue
            cmd.append(w)
            if tail:
                out.append(cmd)
                cmd = []
        out.append(cmd)
    return [c for c in out if c]


# ----------------------------------------------------------------------------------------------- the parsers


@cache
def diffmas_eval_parser():
    from diffmas_eval.commands.cli import build_parser

    return build_parser()


@cache
def lm_eval_parser():
    from lm_eval._cli import HarnessCLI

    return HarnessCLI()._parser


@cache
def sft_parser():
    from diffmas_eval.training.sft import parser

    return parser()


@cache
def accelerate_parser():
    from accelerate.commands.launch import launch_command_parser

    return launch_command_parser()


@cache
def model_arg_names(model: str) -> tuple[set[str], dict[str, tuple[str, ...]]]:
    """The model_args ``model`` takes by name, and the choices of those that have them."""
    from diffmas_eval.harness import diffmas_lm, textmas_lm
    from diffmas_eval.harness.common import hf_argument_names
    from diffmas_eval.latent.config import chain_options

    choices = {o.name: tuple(o.choices) for o in chain_options() if o.choices}
    if model == "diffmas":
        choices["stage2"] = ("hf", "vllm")
        return set(diffmas_lm.OPTIONS) | hf_argument_names(), choices
    choices["backend"] = ("hf", "openai")
    return set(textmas_lm.OPTIONS) | hf_argument_names(), choices


@cache
def makefile() -> tuple[set[str], set[str]]:
    """(targets, variables) of the Makefile."""
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M))
    variables = set(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(?:\?=|:=|\+=|=)", text, re.M))
    return targets, variables


def _argparse(parser, args: list[str]) -> str | None:
    """None if ``parser`` accepts ``args``, else its error line."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as e:
        if e.code:
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {e.code}"
    return None


# ----------------------------------------------------------------------------------------------- the checker


class Block:
    """One shell block's state: the paths its earlier lines wrote, and the problems found so far."""

    def __init__(self):
        self.written: list[str] = []
        self.problems: list[str] = []

    def wrote(self, path: str) -> None:
        self.written.append(path.rstrip("/"))

    def reads(self, what: str, path: str, cmd: str, local_only: bool = False) -> None:
        """``path`` must be written earlier in the block or exist in the repository. ``local_only``: a model or
        dataset name is checked only when it looks like a path (its first part exists, or ./, /), so a hub id
        passes."""
        if not path or any(s in path for s in ("$", "<", "~", "...")) or path.startswith("bundled:"):
            return
        p = path.rstrip("/")
        if any(p == w or p.startswith(w + "/") or w.startswith(p + "/") for w in self.written):
            return
        if (ROOT / p).exists():
            return
        first = p.split("/", 1)[0]
        looks_local = p.startswith((".", "/")) or (ROOT / first).exists() or any(
            w.split("/", 1)[0] == first for w in self.written) or p.endswith((".json", ".jsonl", ".csv", ".yaml"))
        if local_only and not looks_local:
            return
        self.problems.append(f"{cmd}: {what} {path!r} is read but no earlier line writes it and the repository "
                             "has no such file")

    def error(self, cmd: str, message: str) -> None:
        self.problems.append(f"{cmd}: {message}")


def _strip_dots(args: list[str]) -> tuple[list[str], bool]:
    """``...`` in a documented command stands for "the rest as above": drop it and say it was there."""
    kept = [a for a in args if a != "..."]
    return kept, len(kept) != len(args)


def _flag_values(args: list[str], names: set[str]) -> list[tuple[str, str]]:
    found = []
    for i, a in enumerate(args):
        flag, eq, value = a.partition("=")
        if flag in names:
            if eq:
                found.append((flag, value))
            elif i + 1 < len(args):
                found.append((flag, args[i + 1]))
    return found


def _model_args(block: Block, model: str, spec: str, cmd: str) -> None:
    names, choices = model_arg_names(model)
    for item in filter(None, spec.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            block.error(cmd, f"model_arg {item!r} is not KEY=VALUE")
        elif key not in names:
            block.error(cmd, f"--model {model} takes no model_arg {key!r}")
        elif key in choices and value not in choices[key]:
            block.error(cmd, f"model_arg {key}={value!r}: choose from {', '.join(choices[key])}")
        elif key == "peft":
            block.reads("adapter", value, cmd)
        elif key == "pretrained":
            block.reads("model", value, cmd, local_only=True)


def check_diffmas_eval(block: Block, args: list[str], cmd: str) -> None:
    args, partial = _strip_dots(args)
    err = _argparse(diffmas_eval_parser(), args)
    if err and not (partial and "required" in err):
        block.error(cmd, err)
    for flag, value in _flag_values(args, {"--peft", "--readme"}):
        block.reads(flag, value, cmd)
    for _, value in _flag_values(args, {"--model"}):
        if value not in ("hf", "diffmas", "textmas"):
            block.reads("--model", value, cmd, local_only=True)
    _check_our_model_args(block, args, cmd)


def _check_our_model_args(block: Block, args: list[str], cmd: str) -> None:
    """The ``--model_args`` of a ``diffmas`` or ``textmas`` run, checked against that model's options."""
    model = dict(_flag_values(args, {"--model"})).get("--model")
    for _, spec in _flag_values(args, {"--model_args"}):
        if model in ("diffmas", "textmas"):
            _model_args(block, model, spec, cmd)


def check_lm_eval(block: Block, args: list[str], cmd: str) -> None:
    args, partial = _strip_dots(args)
    err = _argparse(lm_eval_parser(), ["run", *args])
    if err and not partial:
        block.error(cmd, err)
    _check_our_model_args(block, args, cmd)


def check_sft(block: Block, args: list[str], cmd: str) -> None:
    args, partial = _strip_dots(args)
    if not partial:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                sft_parser().parse_args_into_dataclasses(args=args)
        except SystemExit as e:
            if e.code:
                block.error(cmd, (err.getvalue().strip().splitlines() or [f"exit {e.code}"])[-1])
        except ValueError as e:  # HfArgumentParser: arguments no dataclass takes
            block.error(cmd, str(e))
    for flag, value in _flag_values(args, {"--dataset_name", "--model_name_or_path", "--resume_from_checkpoint"}):
        block.reads(flag, value, cmd, local_only=flag != "--resume_from_checkpoint")


def check_accelerate(block: Block, args: list[str], cmd: str) -> None:
    err = _argparse(accelerate_parser(), args)
    if err:
        block.error(cmd, err)
        return
    ns = accelerate_parser().parse_args(args)
    if ns.config_file:
        block.reads("--config_file", ns.config_file, cmd)
    if ns.module and ns.training_script == "lm_eval":
        check_lm_eval(block, ns.training_script_args, cmd)
    elif ns.training_script == "trainers/sft.py":
        check_sft(block, ns.training_script_args, cmd)


def check_make(block: Block, args: list[str], cmd: str) -> None:
    targets, variables = makefile()
    for a in args:
        if a.startswith("-"):
            continue
        name, eq, value = a.partition("=")
        if eq:
            if name not in variables:
                block.error(cmd, f"the Makefile has no variable {name}")
            elif name in ("LEADERBOARD_ARGS", "ABLATE_ARGS"):
                sub = "leaderboard" if name == "LEADERBOARD_ARGS" else "ablate"
                check_diffmas_eval(block, [sub, *shlex.split(value)], cmd)
        elif a not in targets:
            block.error(cmd, f"the Makefile has no target {a!r}")


def check_block(body: str) -> list[str]:
    """Every problem of one shell block (empty: the block is right)."""
    block = Block()
    for words in commands(body):
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # VAR=value prefixes
            words = words[1:]
        if not words:
            continue
        cmd = " ".join(words)[:100]
        prog, args = Path(words[0]).name, words[1:]
        if prog == "python" or prog.startswith("python3"):
            if args[:2] == ["-m", "lm_eval"]:
                prog, args = "lm_eval", args[2:]
            elif args[:2] == ["-m", "diffmas_eval.commands.cli"]:
                prog, args = "diffmas-eval", args[2:]
        if prog == "diffmas-eval":
            check_diffmas_eval(block, args, cmd)
        elif prog in ("lm_eval", "lm-eval"):
            check_lm_eval(block, args, cmd)
        elif prog == "accelerate" and args[:1] == ["launch"]:
            check_accelerate(block, args[1:], cmd)
        elif prog == "diffmas-sft":
            check_sft(block, args, cmd)
        elif prog == "make":
            check_make(block, args, cmd)
        for _, value in _flag_values(words, WRITES):
            block.wrote(value)
        for i, w in enumerate(words[:-1]):
            if w in (">", ">>"):
                block.wrote(words[i + 1])
        if prog == "mkdir":
            for w in args:
                if not w.startswith("-"):
                    block.wrote(w)
    return block.problems


def shell_blocks() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for lang, body, line in fenced_blocks(path.read_text()):
            if lang in SHELL:
                found.append((f"{path.relative_to(ROOT)}:{line}", body))
    return found


# ----------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("where,body", shell_blocks(), ids=[w for w, _ in shell_blocks()])
def test_every_shell_block_parses(where, body):
    problems = check_block(body)
    assert not problems, f"{where}:\n" + "\n".join(problems)


def test_the_checker_covers_the_commands_the_docs_teach():
    """The parametrized test above is not vacuous: the README's GPU quickstart is among the blocks, and each
    kind of command the checker knows occurs somewhere."""
    text = "\n".join(body for _, body in shell_blocks())
    for needle in ("lm_eval --model diffmas", "accelerate launch trainers/sft.py", "diffmas-eval sft-data",
                   "make test", "make leaderboard", "--model textmas", "-m lm_eval"):
        assert needle in text, needle


def test_the_checker_flags_training_on_a_file_no_line_wrote():
    """The README's old training example built one SFT set and trained on another."""
    body = """\
.venv/bin/diffmas-eval sft-data --family commonsense --out data/commonsense_sft.jsonl   # or math, code
accelerate launch trainers/sft.py --model_name_or_path Qwen/Qwen3-8B --dataset_name data/math_sft.jsonl \\
    --use_peft --lora_r 8 --agents 4 --latent_steps 10 --output_dir out/
lm_eval --model diffmas --model_args pretrained=Qwen/Qwen3-8B,peft=out/ --tasks diffmas_gsm8k
"""
    problems = check_block(body)
    assert len(problems) == 1 and "data/math_sft.jsonl" in problems[0], problems
    assert not check_block(body.replace("commonsense_sft", "math_sft").replace("family commonsense", "family math"))


@pytest.mark.parametrize("body,expected", [
    ("diffmas-eval ask 'q' --latent_steps 4", "unrecognized arguments: --latent_steps"),
    ("diffmas-eval ask 'q' --trace stack", "invalid choice: 'stack'"),
    ("diffmas-eval sft-data --family physics --out x.jsonl", "invalid choice: 'physics'"),
    ("lm_eval --model diffmas --model_args pretrained=m,latent_step=4 --tasks t", "no model_arg 'latent_step'"),
    ("lm_eval --model diffmas --model_args pretrained=m,trace=stack --tasks t", "trace='stack': choose from"),
    ("lm_eval --model textmas --model_args pretrained=m,backend=vllm --tasks t", "backend='vllm'"),
    ("lm_eval --model diffmas --task gsm8k --batchsize 8", "unrecognized arguments"),
    ("lm_eval --model diffmas --model_args pretrained=m,peft=out/a --tasks t", "adapter 'out/a' is read"),
    ("accelerate launch trainers/sft.py --model_name_or_path m --dataset_name d.jsonl --lora_rank 8",
     "lora_rank"),
    ("accelerate launch trainers/sft.py --dataset_name x --trace stack", "invalid choice: 'stack'"),
    ("accelerate launch --config_file trainers/configs/nope.yaml trainers/sft.py --dataset_name x",
     "--config_file 'trainers/configs/nope.yaml' is read"),
    ("accelerate launch -m lm_eval --model diffmas --model_args agent=3 --tasks t", "no model_arg 'agent'"),
    ("make leaderbord", "no target 'leaderbord'"),
    ("make leaderboard MODELS=x", "no variable MODELS"),
    ('make leaderboard LEADERBOARD_ARGS="--agnets 4"', "unrecognized arguments: --agnets"),
])
def test_the_checker_flags_bad_commands(body, expected):
    problems = check_block(body)
    assert any(expected in p for p in problems), problems


def test_python_blocks_compile_and_their_imports_resolve():
    checked = 0
    for path in DOCS:
        for lang, body, line in fenced_blocks(path.read_text()):
            if lang not in ("python", "py"):
                continue
            where = f"{path.relative_to(ROOT)}:{line}"
            tree = ast.parse(body, where)
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module:
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        assert hasattr(module, alias.name) or importlib.util.find_spec(
                            f"{node.module}.{alias.name}"), f"{where}: {node.module} has no {alias.name}"
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        importlib.import_module(alias.name)
            checked += 1
    assert checked >= 3


def _generated():
    """(page, section name, regenerate into a copy of the page: True if it changed, the command)."""
    from benchmarks.readme import section as bench_section
    from diffmas_eval.commands.readme import replace_section
    from diffmas_eval.commands.reference import OPTIONS_COMMAND, STATUS_COMMAND, update_options
    from diffmas_eval.leaderboard.ablate import AblationOptions
    from diffmas_eval.leaderboard.results import ablations as ablate_report
    from diffmas_eval.leaderboard.results import sections as report

    output = ROOT / "leaderboards" / "leaderboard.csv"
    return [
        ("docs/options.md", "options", update_options, OPTIONS_COMMAND),
        ("README.md", "status", update_options, STATUS_COMMAND),
        ("docs/leaderboard.md", "leaderboard", lambda p: report.regenerate(p, output), report.README_COMMAND),
        ("README.md", "headline", lambda p: report.regenerate(p, output), report.HEADLINE_COMMAND),
        ("docs/ablations.md", "ablations",
         lambda p: ablate_report.update_readme(p, ROOT / AblationOptions.output), ablate_report.README_COMMAND),
        ("docs/performance.md", "performance",
         lambda p: replace_section(p, "performance", bench_section(ROOT / "benchmarks" / "results")),
         "make performance (python benchmarks/readme.py docs/performance.md benchmarks/results)"),
        ("docs/evalplus.md", "codegen",
         lambda p: replace_section(p, "codegen", bench_section(ROOT / "leaderboards" / "codegen", "codegen")),
         "make codegen-table (python benchmarks/readme.py docs/evalplus.md leaderboards/codegen --section codegen)"),
    ]


@pytest.mark.parametrize("page,name", [(p, n) for p, n, _, _ in _generated()])
def test_every_generated_section_is_fresh(page, name, tmp_path):
    _, _, regenerate, command = next(g for g in _generated() if g[:2] == (page, name))
    copy = tmp_path / Path(page).name
    shutil.copy(ROOT / page, copy)
    assert f"<!-- {name}:start" in copy.read_text(), f"{page} lost its {name} markers"
    assert not regenerate(copy), f"{page}: the {name} section is stale; regenerate it with: {command}"


def test_a_stale_section_fails_naming_its_command(tmp_path):
    page = tmp_path / "options.md"
    page.write_text((ROOT / "docs" / "options.md").read_text().replace("| `latent_steps` |", "| `latent_stepz` |"))
    _, _, regenerate, command = next(g for g in _generated() if g[1] == "options")
    assert regenerate(page) and command == "diffmas-eval options --readme docs/options.md"


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 250
    for heading in ("## Status", "## Install", "## GPU quickstart", "## The two commands", "## Headline results",
                    "## Documentation", "## Citation", "## License"):
        assert heading in text, heading
    assert "make test          # the test suite" in text  # .ci/run calls make test
    for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):  # relative links point at files
        assert (ROOT / link).exists(), link


def test_the_citation_file_names_both_papers():
    import yaml

    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    ids = [cff["preferred-citation"]["identifiers"][0]["value"]] + [r["identifiers"][0]["value"]
                                                                    for r in cff["references"]]
    assert ids == ["arXiv:2604.21794", "arXiv:2511.20639"]
    readme = (ROOT / "README.md").read_text()
    assert "arXiv:2604.21794" in readme and "arXiv:2511.20639" in readme


def test_make_docs_without_the_docs_extra_names_what_to_install(tmp_path):
    """A Python without mkdocs: ``make docs`` stops before building and says which extra to install."""
    bare = tmp_path / "python"
    bare.write_text("#!/bin/sh\nexec python3 -S -c 'raise SystemExit(1)'\n")  # any import fails
    bare.chmod(0o755)
    out = subprocess.run(["make", "--no-print-directory", "docs", f"PY={bare}", "STAMP="], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "pip install -c constraints.txt -e '.[docs]'" in out.stderr, out.stderr


def test_the_site_builds_strictly(tmp_path):
    """``mkdocs build --strict``: a broken link, a missing anchor or a page left out of the nav fails."""
    import importlib.util

    missing = [m for m in ("mkdocs", "material") if importlib.util.find_spec(m) is None]
    assert not missing, f"docs extra missing ({', '.join(missing)}): make install, or pip install -e '.[docs]'"
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    for page in ("index.html", "quickstart/index.html", "options/index.html", "leaderboards/accuracy.png"):
        assert (tmp_path / "site" / page).exists(), page


@pytest.mark.slow
def test_the_python_api_snippet_runs_on_the_bundled_model(local_data):
    """The first snippet of docs/usage.md, as written: stage 1 and stage 2 on the bundled model (about 20 s)."""
    (lang, body, _), *_ = [b for b in fenced_blocks((ROOT / "docs" / "usage.md").read_text()) if b[0] == "python"]
    scope: dict = {}
    exec(compile(body, "docs/usage.md", "exec"), scope)  # noqa: S102 - the documented snippet itself
    assert scope["trace"] is not None and scope["answer"] is not None
