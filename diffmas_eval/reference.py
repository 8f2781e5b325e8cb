"""The README's option reference (``diffmas-eval options --readme README.md``), generated from the code.

``options_reference`` lists the chain's options, made from the schema (``latent.config.chain_options``), with where
each front end offers it, then the lm-eval models' other ``OPTIONS``: a new option or a changed default shows up
there when the README is regenerated, and ``tests/test_schema.py`` fails while the README lags behind the code.
It is a tool above the harness and the leaderboard (it reads both); ``readme.replace_section`` only writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .readme import replace_section

if TYPE_CHECKING:
    from .latent.config import LatentConfig

OPTIONS_COMMAND = "diffmas-eval options --readme README.md"
# where each front end's options are typed
FRONT_TITLES = {"lm_eval": "lm-eval `--model_args`", "ask": "`diffmas-eval ask`", "sft": "`trainers/sft.py`",
                "leaderboard": "`diffmas-eval leaderboard`", "memory": "`diffmas-eval memory`"}


def spelled(front: str, name: str) -> str:
    """How ``front`` spells option ``name``: a model_arg ``name=``, TRL's ``--name`` (underscores kept, as
    ``HfArgumentParser`` names fields), or a ``diffmas-eval`` flag (``options.flag``)."""
    from .options import flag

    return f"{name}=" if front == "lm_eval" else f"--{name}" if front == "sft" else flag(name)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def options_reference(config_class: type[LatentConfig] | None = None) -> str:
    """The option reference: the chain's options with where each is offered, then every other model_arg of the
    ``diffmas`` and ``textmas`` lm-eval models (one help line each, as their typo message lists them)."""
    from .harness import diffmas_lm, textmas_lm
    from .latent.config import FRONT_ENDS, LatentConfig, chain_options
    from .leaderboard.config import chain_defaults

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


def update_options(readme: Path) -> bool:
    """Regenerate README's option reference; True if it changed."""
    return replace_section(readme, "options", options_reference(), OPTIONS_COMMAND)
