"""``diffmas-eval leaderboard --plan``: every training and cell with the resources it asks and its peak accelerator
memory, before anything runs; and the refusal of a job no GPU of the cluster can hold.

Why an estimate and not a trial: a cell that runs out of memory after an hour of trainings has cost that hour. The
estimate is the model's weights in the run's dtype (its parameters counted on the ``meta`` device: nothing is
loaded), plus the trace (``memory.bytes_per_position`` x the upstream agents' prompts and latent steps) and the KV
cache of the decode budget (prompt + answer cap), both times the batch size. A training adds its rows' KV at
``--train-max-length`` x its batch; activations and optimizer state (LoRA's are small) are not counted, so a
training's figure is a lower bound. Time: seconds per sample measured by an earlier run's cells of the same method
and task (any settings), times this run's items.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import TEXT_METHODS, Settings

PROMPT_TOKENS = 256  # a question with its role prompt and chat template (the estimate's assumption)
LATENT = ("latentmas", "diffmas", "latentmas-hier", "diffmas-hier", "stitchmas")


@dataclass
class JobPlan:
    name: str
    kind: str  # "train" or "cell"
    gpus: float
    cpus: int
    weights: int  # bytes
    cache: int  # bytes: trace + KV (cells), the rows' KV (trainings)
    seconds: float | None = None  # measured rate x items (cells with an earlier measurement)

    @property
    def peak(self) -> int:
        return self.weights + self.cache


def model_facts(model: str) -> tuple[int, str, int]:
    """Parameters (counted on the meta device), the dtype the model loads in, and the KV bytes per position."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..memory import bytes_per_position, load_text_config
    from ..models import TRACE_DTYPES

    config = load_text_config(model)
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    dtype = dtype.removeprefix("torch.")
    dtype = dtype if dtype in TRACE_DTYPES else "float32"
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    return params, dtype, bytes_per_position(config, dtype)


def cell_positions(settings: Settings, method: str, task: str) -> int:
    """Positions one row holds at its peak: the trace (latent methods) or the notes (text MAS), then the prompt and
    the answer budget."""
    upstream = max(0, settings.agents - 1)
    final = PROMPT_TOKENS + settings.answer_cap(task)
    if method in LATENT:
        return upstream * (PROMPT_TOKENS + settings.latent_steps) + final
    if method in TEXT_METHODS and method not in ("single", "single-sft"):
        return upstream * settings.agent_max_tokens + final
    return final


def measured_seconds(runs: Path, method: str, task: str) -> float | None:
    """Seconds per item of the latest earlier cell of ``method`` x ``task`` (any settings), if one exists."""
    found = sorted((runs / method).glob(f"results_{task}_*.json"), key=lambda p: p.stat().st_mtime)
    for path in reversed(found):
        try:
            meta = json.loads(path.read_text()).get("leaderboard", {})
            return float(meta["seconds_per_sample"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def plan_jobs(settings: Settings, need: list, todo: list, runs: Path, batch: int | str, gpus_cell: float,
              gpus_training: int, cpus: int) -> list[JobPlan]:
    params, dtype, per_position = model_facts(settings.model)
    width = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    weights = params * width
    rows = batch if isinstance(batch, int) else 1  # auto: at least one row
    plans = [JobPlan(f"train {m} ({f})", "train", gpus_training, cpus, weights,
                     per_position * settings.train_max_length * settings.budget(f)[1]) for m, f in need]
    for method, task in todo:
        rate = measured_seconds(runs, method, task)
        items = settings.limit_of(task) or None
        plans.append(JobPlan(f"{method} x {task}", "cell", gpus_cell, cpus, weights,
                             per_position * cell_positions(settings, method, task) * rows,
                             rate * items if rate is not None and items else None))
    return plans


def check_fit(plans: list[JobPlan], largest: tuple[str, int] | None) -> None:
    """Refuse, before anything runs, a job whose estimate exceeds the largest GPU (the memory of the GPUs it asks
    for, a cell spread over several)."""
    if largest is None:
        return
    name, total = largest
    from ..memory import human

    for p in plans:
        if p.gpus and p.peak > total * max(1, int(p.gpus)):
            raise ValueError(f"{p.name}: needs about {human(p.peak)} of accelerator memory (weights "
                             f"{human(p.weights)} + cache {human(p.cache)}), more than the largest GPU has "
                             f"({name}, {human(total)}{' each' if p.gpus > 1 else ''}); use a smaller batch or "
                             "model, or more GPUs per job")


def describe(plans: list[JobPlan], nodes: list[dict], largest: tuple[str, int] | None) -> str:
    from ..memory import human

    where = ", ".join(f"{n['node']}: {n['gpus']:g} GPU / {n['cpus']:g} CPU" for n in nodes) or "this machine"
    lines = [f"plan: {sum(p.kind == 'train' for p in plans)} training(s), {sum(p.kind == 'cell' for p in plans)} "
             f"cell(s) to run on {where}" + (f"; largest GPU {largest[0]} ({human(largest[1])})" if largest else "")]
    width = max((len(p.name) for p in plans), default=0)
    for p in plans:
        time = "" if p.seconds is None else f"~{p.seconds * p.gpus / 3600:.2f} GPU-h ({p.seconds:.0f} s)"
        lines.append(f"  {p.name:<{width}}  {p.gpus:g} GPU {p.cpus} CPU  peak ~{human(p.peak)} "
                     f"(weights {human(p.weights)} + {'rows' if p.kind == 'train' else 'trace/KV'} "
                     f"{human(p.cache)})  {time}".rstrip())
    timed = [p for p in plans if p.seconds is not None]
    hours = sum(p.seconds * p.gpus for p in timed) / 3600
    work = sum(p.seconds for p in timed) / 3600
    lines.append(f"total: {hours:.2f} GPU-hours ({work:.2f} hours of jobs) for the {len(timed)} cell(s) with a "
                 f"measured rate; {len(plans) - len(timed)} job(s) without one")
    return "\n".join(lines)
