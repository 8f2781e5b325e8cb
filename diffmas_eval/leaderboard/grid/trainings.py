"""What a trained method is trained on: each family's SFT set (what ``diffmas-eval sft-data`` writes, the last rows
of each source file), the check that no trained method scores an item its set contains, and when an adapter's
directory holds a finished training.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...tasks.registry import FAMILY
from ...training.data import build_set, write_chat

MARKER = "leaderboard-adapter.json"


# lm-eval's own tasks over the same source files the SFT sets take their last rows from (same item order)
SAME_SOURCE = {"gsm8k": "diffmas_gsm8k", "gsm8k_cot": "diffmas_gsm8k", "arc_challenge": "diffmas_arc_challenge",
               "commonsense_qa": "diffmas_commonsense_qa", "diffmas_arc_challenge_gen": "diffmas_arc_challenge",
               "diffmas_commonsense_qa_gen": "diffmas_commonsense_qa", "mbpp": "mbppplus"}


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "diffmas.json")


def sft_set(family: str, n: int | None, work: Path, data_dir: str | None,
            source: str = "offline") -> tuple[Path, dict[str, int], str]:
    """Write the family's SFT set (``diffmas-eval sft-data``); return it, its disjointness bounds and the source
    its rows came from (``paper`` falls back to ``offline`` without the hub)."""

    path = work / "sft" / f"{family}{'' if source == 'offline' else '-' + source}{'' if n is None else f'-{n}'}.jsonl"
    bounds, used = build_set(family, path, n, data_dir, source)
    return path, bounds, used


def check_disjoint(family: str, bounds: dict[str, int], tasks: list[str], limit: int) -> None:
    """Refuse to score a trained method on items its SFT set contains (``--limit`` beyond the bound)."""
    for task in tasks:
        bound = bounds.get(SAME_SOURCE.get(task, task))
        if bound is not None and (limit == 0 or limit > bound) and (FAMILY.get(task) in (family, None)):
            raise ValueError(f"{task}: the {family} SFT set holds its last rows, so a trained method may score at "
                             f"most its first {bound} items, but --limit is {limit or 'all'}; use --limit <= {bound} "
                             f"or fewer SFT examples (--sft-examples {family}=N)")


def finished(out: Path, digest: str) -> bool:
    marker = out / MARKER
    if not marker.exists() or not all((out / f).exists() for f in ADAPTER_FILES):
        return False
    try:
        return json.loads(marker.read_text()).get("hash") == digest
    except json.JSONDecodeError:
        return False


def chat_set(data: Path) -> Path:
    """``data`` (plain rows) as chat rows (``training.data.to_chat``), beside it."""

    return write_chat(data, data.with_name(f"{data.stem}-chat.jsonl"))
