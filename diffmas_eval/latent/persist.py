"""The chain's options saved beside a trained adapter or model, so evaluation rebuilds the same chain."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .chain import AgentChain
from .config import LatentConfig

CONFIG_FILE = "diffmas.json"
REALIGN_FILE = "diffmas_realign.pt"


def save_chain_config(directory: Path, config: LatentConfig, chain: AgentChain,
                      training: dict | None = None) -> None:
    """``training``: how it was trained (the recipe: optimiser, schedule, batch, LoRA), kept as provenance
    under ``"training"``; loading reads only the chain's options."""
    directory.mkdir(parents=True, exist_ok=True)
    data = config.to_dict()
    data["checkpoint_agents"] = False  # a training-time choice, not part of the model
    data["trained_realign"] = chain.realigner.weight.requires_grad
    if training:
        data["training"] = training
    (directory / CONFIG_FILE).write_text(json.dumps(data, indent=1))
    if data["trained_realign"]:
        torch.save(chain.realigner.weight.detach().cpu(), directory / REALIGN_FILE)


def load_chain_config(*directories: str | Path | None) -> tuple[dict, Path | None]:
    """The saved chain options (and the realignment file) of the first directory that has them."""
    for d in directories:
        if d and (Path(d) / CONFIG_FILE).exists():
            data = json.loads((Path(d) / CONFIG_FILE).read_text())
            # saved before realign_target existed: latent vectors were matched to the weight rows
            data.setdefault("realign_target", "weight_rows")
            data.pop("training", None)  # provenance, not a chain option
            realign = Path(d) / REALIGN_FILE if data.pop("trained_realign", False) else None
            return data, realign
    return {}, None
