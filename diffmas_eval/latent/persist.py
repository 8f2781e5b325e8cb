"""A trained chain as an artifact: what is saved beside an adapter (or model), and the one function that loads it.

``save_chain_config`` writes ``diffmas.json`` (the chain's options, its roles, whether the realignment was
trained, the training recipe as provenance, the schema version and the writing package's version) and, for a
trained realignment, ``diffmas_realign.pt``; ``write_model_card`` writes the folder's ``README.md``. The trainer
calls both whenever it saves (``training/trainer.py``), so a folder TRL pushes to the Hub carries them.

``load_trained_chain`` is the one reading: every front end that evaluates a trained chain (``lm_eval --model
diffmas``'s ``peft=``, ``diffmas-eval ask --peft``, the ablations' gradient probe, the benchmarks) gets its
options, roles and trained realignment from it, so each rebuilds the chain the adapter was trained with.
Explicit options win; the saved values of the options that shape the trace apply when not given
(``latent.config.saved_fields``); a trained realignment applies when the realignment mode is the trained one.
A path is a local folder or a Hub repo id (resolved through ``huggingface_hub.snapshot_download``, so
``HF_HUB_OFFLINE=1`` reads the local Hub cache).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download

from .. import __version__
from ..prompts import Role, resolve_roles
from .chain import AgentChain
from .config import LatentConfig, saved_fields

CONFIG_FILE = "diffmas.json"
REALIGN_FILE = "diffmas_realign.pt"
CARD_FILE = "README.md"
# 1: diffmas.json carries "schema_version" and "diffmas_eval_version"; files without them (version 0) load the
# same way, with ``realign_target`` defaulting to what it meant before it existed
SCHEMA_VERSION = 1
_META = ("schema_version", "diffmas_eval_version", "training")  # provenance, not chain options
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def save_chain_config(directory: Path, config: LatentConfig, chain: AgentChain,
                      training: dict | None = None) -> None:
    """``training``: how it was trained (the recipe: optimiser, schedule, batch, LoRA), kept as provenance
    under ``"training"``; loading reads only the chain's options."""
    directory.mkdir(parents=True, exist_ok=True)
    data = config.to_dict()
    data["checkpoint_agents"] = data["checkpoint_final"] = False  # training-time choices, not part of the model
    data["trained_realign"] = chain.realigner.weight.requires_grad
    if training:
        data["training"] = training
    data["schema_version"] = SCHEMA_VERSION
    data["diffmas_eval_version"] = __version__
    (directory / CONFIG_FILE).write_text(json.dumps(data, indent=1))
    if data["trained_realign"]:
        torch.save(chain.realigner.weight.detach().cpu(), directory / REALIGN_FILE)


def load_chain_config(*directories: str | Path | None) -> tuple[dict, Path | None]:
    """The saved chain options (and the realignment file) of the first directory that has them."""
    for d in directories:
        if d and (Path(d) / CONFIG_FILE).exists():
            data = json.loads((Path(d) / CONFIG_FILE).read_text())
            version = data.get("schema_version", 0)
            if not isinstance(version, int) or version > SCHEMA_VERSION:
                raise ValueError(f"{Path(d) / CONFIG_FILE} has schema version {version}, written by diffmas-eval "
                                 f"{data.get('diffmas_eval_version', '?')}; this diffmas-eval reads versions up to "
                                 f"{SCHEMA_VERSION}: upgrade diffmas-eval")
            # saved before realign_target existed: latent vectors were matched to the weight rows
            data.setdefault("realign_target", "weight_rows")
            for key in _META:
                data.pop(key, None)
            realign = Path(d) / REALIGN_FILE if data.pop("trained_realign", False) else None
            return data, realign
    return {}, None


def resolve_artifact(path: str | Path | None) -> str | None:
    """A local folder as given; a Hub repo id (``org/name``, not a local path) as its downloaded snapshot (adapter,
    ``diffmas.json``, realignment: the whole repo). ``HF_HUB_OFFLINE=1`` resolves from the Hub cache alone."""
    if path is None:
        return None
    text = str(path)
    if Path(text).exists() or not _REPO_ID.match(text):
        return text

    try:
        return snapshot_download(repo_id=text)
    except Exception as err:  # offline and not cached, no such repo, no access
        raise ValueError(f"{text!r} is neither a local folder nor a Hub repo that could be downloaded "
                         f"({type(err).__name__}: {err})") from err


@dataclass
class TrainedChain:
    """What ``load_trained_chain`` resolved: the chain's config and roles, the trained realignment that applies
    (None: the config's own), and where the artifact lies (``adapter``: a local folder, for PEFT)."""

    config: LatentConfig
    roles: dict[str, Role]
    realign: Path | None = None
    adapter: str | None = None
    saved: dict[str, Any] = field(default_factory=dict)  # diffmas.json's chain options ({}: nothing was saved)

    def build(self, model, tokenizer, **kwargs) -> AgentChain:
        """The ``AgentChain`` over ``model``, its trained realignment loaded."""
        chain = AgentChain(model, tokenizer, self.config, self.roles, **kwargs)
        if self.realign is not None:
            chain.realigner.weight.data.copy_(torch.load(self.realign, map_location=chain.device))
        return chain


def load_trained_chain(path: str | Path | None = None, *, also: str | Path | None = None,
                       config_class: type[LatentConfig] = LatentConfig, family: str | None = None,
                       roles_file: str | None = None, **overrides: Any) -> TrainedChain:
    """The chain an adapter (or model) folder was trained with, ``overrides`` applied.

    ``path``: the adapter (a folder or a Hub repo id; None: an untrained chain). ``also``: a local model folder
    looked at when ``path`` has no ``diffmas.json`` (a fully fine-tuned model saved with it). ``overrides``: chain
    options by name (``agents``, ``latent_steps``, ``realign``, ``trace``, ``topology``, ...; None means not given),
    which win over the saved ones; ``family``/``roles_file``: the role instructions (``prompts.resolve_roles``).
    """
    adapter = resolve_artifact(path)
    saved, realign_file = load_chain_config(adapter, also)
    given = {k: v for k, v in overrides.items() if v is not None}
    agents = given.pop("agents", None)
    roles, order = resolve_roles(family, roles_file, agents, given.get("topology"), saved.get("roles"),
                                 saved_topology=saved.get("topology"))
    values = {k: saved[k] for k in saved_fields(config_class) if k in saved}  # what was trained
    config = config_class(roles=order, **{**values, **given})
    config.check_roles(roles)
    trained = realign_file if realign_file is not None and config.realign == saved.get("realign") else None
    return TrainedChain(config, roles, trained, adapter, saved)


def model_card(config: LatentConfig, base_model: str | None, training: dict | None = None,
               repo: str | None = None) -> str:
    """The folder's ``README.md``: the chain, the recipe, and how to score it with lm-eval or ask it a question."""
    where = repo or "PATH_OR_REPO_ID"
    base = base_model or "BASE_MODEL"
    recipe = "\n".join(f"| `{k}` | {v} |" for k, v in (training or {}).items()) or "| (not recorded) | |"
    steps = config.latent_steps
    return f"""---
base_model: {base}
library_name: peft
tags:
- diffmas
- latent-multi-agent
- trl
- sft
---

# A trained DiffMAS chain

A LoRA adapter on `{base}` trained through a DiffMAS agent chain with
[diffmas-eval](https://pypi.org/project/diffmas-eval/) {__version__}: one model plays every agent; the upstream
agents write a latent trace (their prompts and `latent_steps` latent thoughts each, on one shared KV cache) and the
final agent reads it and answers. The loss was on the final agent's answer, through the whole trace.

## The chain (`diffmas.json`, applied when the adapter is loaded)

| option | value |
| --- | --- |
| agents | {len(config.roles)} ({", ".join(config.roles)}) |
| latent_steps | {steps} |
| realign | {config.realign} |
| trace | {config.trace} |
| topology | {config.topology} |
| stage1_grad (training) | {config.stage1_grad} |

`diffmas_realign.pt`, when present, is the realignment trained with the adapter.

## The recipe

| setting | value |
| --- | --- |
{recipe}

## Use it

```bash
pip install diffmas-eval
# score it: the saved chain (agents, latent steps, realignment) is rebuilt from diffmas.json
lm_eval --model diffmas --model_args pretrained={base},peft={where} --tasks diffmas_gsm8k --apply_chat_template
# ask it one question
diffmas-eval ask "What is 12 + 30?" --model {base} --peft {where}
```

Options given explicitly (`latent_steps=`, `--latent-steps`) override the saved ones.
"""


def write_model_card(directory: Path, config: LatentConfig, base_model: str | None,
                     training: dict | None = None, repo: str | None = None) -> Path:
    path = Path(directory) / CARD_FILE
    path.write_text(model_card(config, base_model, training, repo))
    return path
