"""``diffmas-eval leaderboard --plan``: every training and cell with the resources it asks and its peak accelerator
memory, before anything runs; and the refusal of a job no GPU of the cluster can hold.

Why an estimate and not a trial: a cell that runs out of memory after an hour of trainings has cost that hour. The
estimate is the model's weights in the run's dtype (its parameters counted on the ``meta`` device: nothing is
loaded), plus the trace (``memory.bytes_per_position`` x the upstream agents' prompts and latent steps) and the KV
cache of the decode budget (prompt + answer cap), both times the batch size. A training adds its rows' KV at
``--train-max-length`` x its batch (an ablation's gradient probe: one row, float32 weights); activations and
optimizer state (LoRA's are small) are not counted, so a training's figure is a lower bound.

Time, per token: an earlier run's cell of the same method and task (any settings) gives seconds per generated token
(its ``seconds_per_sample / tokens_per_sample``, the two columns of leaderboard.csv), and this run's cell generates
at most items x samples x (answer cap + the text MAS's upstream notes) tokens: so the figure is an upper bound,
reached when every answer runs to its cap, and it carries over to another cap or protocol (the CPU grid's 96-token
answers to the paper's 2k-32k), where a per-item rate would not. A log-likelihood task generates nothing: its
rate is per item.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ...memory import bytes_per_position, human, load_text_config
from ...models import TRACE_DTYPES
from .settings import TEXT_METHODS, Settings

PROMPT_TOKENS = 256  # a question with its role prompt and chat template (the estimate's assumption)
LATENT = ("latentmas", "diffmas", "latentmas-hier", "diffmas-hier", "stitchmas")


@dataclass
class JobPlan:
    name: str
    kind: str  # "train", "cell" or "probe" (an ablation's gradient probe: it asks for a cell's GPUs)
    gpus: float
    cpus: int
    weights: int  # bytes
    cache: int  # bytes: trace + KV (cells), the rows' KV (trainings, probes)
    seconds: float | None = None  # at most: measured seconds per token x this run's token budget (cells)

    @property
    def peak(self) -> int:
        return self.weights + self.cache


WIDTH = {"float32": 4, "bfloat16": 2, "float16": 2}


@lru_cache(maxsize=8)
def model_facts(model: str) -> tuple[int, str, int]:
    """Parameters (counted on the meta device), the dtype the model loads in, and the KV bytes per position."""


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
    if _writes_notes(method):
        return upstream * settings.agent_max_tokens + final
    return final


def _writes_notes(method: str) -> bool:
    return method in TEXT_METHODS and method not in ("single", "single-sft")


def token_budget(settings: Settings, method: str, task: str) -> int:
    """The most tokens one answer of this cell generates: its cap, and the upstream agents' notes (text MAS)."""
    notes = max(0, settings.agents - 1) * settings.agent_max_tokens if _writes_notes(method) else 0
    return settings.answer_cap(task) + notes


def measured_rate(runs: Path, method: str, task: str) -> tuple[float, float] | None:
    """``(seconds_per_sample, tokens_per_sample)`` of the latest earlier cell of ``method`` x ``task`` (any
    settings), if one exists; tokens 0: a log-likelihood task."""
    found = sorted((runs / method).glob(f"results_{task}_*.json"), key=lambda p: p.stat().st_mtime)
    for path in reversed(found):
        try:
            meta = json.loads(path.read_text()).get("leaderboard", {})
            return float(meta["seconds_per_sample"]), float(meta.get("tokens_per_sample") or 0)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def cell_seconds(settings: Settings, method: str, task: str, runs: Path) -> float | None:
    """At most this many seconds for the cell (module docstring): the measured seconds per token times the tokens
    its items may generate; per item for a task that generates nothing. None: no earlier cell, or every item."""
    rate, items = measured_rate(runs, method, task), settings.limit_of(task)
    if rate is None or not items:
        return None
    seconds, tokens = rate
    if tokens <= 0:
        return seconds * items
    return seconds / tokens * items * settings.decoding().samples * token_budget(settings, method, task)


def train_plan(name: str, settings: Settings, gpus: float, cpus: int, family: str | None = None) -> JobPlan:
    """An adapter's training: a batch of ``train_max_length`` rows, the batch of the family's budget."""
    params, dtype, per_position = model_facts(settings.model)
    return JobPlan(name, "train", gpus, cpus, params * WIDTH[dtype],
                   per_position * settings.train_max_length * settings.budget(family)[1])


def probe_plan(name: str, settings: Settings, gpus: float, cpus: int) -> JobPlan:
    """An ablation's gradient probe: the model in float32 (``ablate.probe``), one training row at a time."""
    params, dtype, per_position = model_facts(settings.model)
    return JobPlan(name, "probe", gpus, cpus, params * 4,
                   per_position * WIDTH["float32"] // WIDTH[dtype] * settings.train_max_length)


def cell_plan(name: str, settings: Settings, method: str, task: str, runs: Path, batch: int | str, gpus: float,
              cpus: int) -> JobPlan:
    params, dtype, per_position = model_facts(settings.model)
    rows = batch if isinstance(batch, int) else 1  # auto: at least one row
    return JobPlan(name, "cell", gpus, cpus, params * WIDTH[dtype],
                   per_position * cell_positions(settings, method, task) * rows,
                   cell_seconds(settings, method, task, runs))


def plan_jobs(settings: Settings, need: list, todo: list, runs: Path, batch: int | str, gpus_cell: float,
              gpus_training: int, cpus: int) -> list[JobPlan]:
    """The leaderboard's jobs: ``need`` (method, family) trainings, ``todo`` (method, task) cells."""
    return [*(train_plan(f"train {m} ({f})", settings, gpus_training, cpus, f) for m, f in need),
            *(cell_plan(f"{m} x {t}", settings, m, t, runs, batch, gpus_cell, cpus) for m, t in todo)]


def plans_of(jobs: list, runs: Path, batch: int | str, gpus_cell: float, gpus_training: int,
             cpus: int) -> list[JobPlan]:
    """The estimate of each ``scheduler.Job`` from what it computes (its ``what``)."""
    plans = []
    for job in jobs:
        kind, settings, *rest = job.what
        if kind == "train":
            plans.append(train_plan(job.name, settings, gpus_training, cpus, *rest[:1]))
        elif kind == "probe":
            plans.append(probe_plan(job.name, settings, gpus_cell, cpus))
        else:
            plans.append(cell_plan(job.name, settings, *rest, runs, batch, gpus_cell, cpus))
    return plans


def room(total: int, gpus: float, reserved: float = 0.0) -> int:
    """Bytes a job of ``gpus`` GPUs can count on, on GPUs of ``total`` bytes of which a server holds ``reserved``
    (a fraction: vLLM's ``--gpu-memory-utilization`` on a GPU it shares with the jobs): a fraction of a GPU is that
    share of what the server leaves (Ray packs fractions by count, not by memory: two cells at 0.5 share one GPU's
    memory), and K GPUs are K times it."""
    left = total * (1.0 - reserved)
    return int(left * (gpus if gpus < 1 else int(gpus)))


def check_fit(plans: list[JobPlan], largest: tuple[str, int] | None, reserved: float = 0.0) -> None:
    """Refuse, before anything runs, a job whose estimate exceeds its share of the largest GPU (``room``: the
    GPUs it asks for, a cell spread over several, or its fraction of one; less what a server beside it holds)."""
    if largest is None:
        return
    name, total = largest

    for p in plans:
        if p.gpus and p.peak > room(total, p.gpus, reserved):
            gpu = f"({name}, {human(total)}{' each' if p.gpus > 1 else ''})"
            whole = p.gpus >= 1 and not reserved
            share = (f"{p.gpus:g} of it" if p.gpus < 1 else f"{int(p.gpus)} of them") + (
                f" less the vLLM server's {reserved:.0%}" if reserved else "")
            raise ValueError(f"{p.name}: needs about {human(p.peak)} of accelerator memory (weights "
                             f"{human(p.weights)} + cache {human(p.cache)}), more than the largest GPU has {gpu}"
                             + ("" if whole else f" for it ({share}: {human(room(total, p.gpus, reserved))})")
                             + "; use a smaller batch or model, more GPUs per job"
                             + (", or a GPU of its own for the server" if reserved else ""))


def fit_check(plans: Callable[[float, int], list[JobPlan]], reserved: float = 0.0) -> Callable:
    """``scheduler.Resources.fits``: once ``run_jobs`` knows the largest GPU and the GPUs per job, the jobs'
    estimates (``plans(per_cell, per_training)``) are checked against their share of it (``reserved``: what a
    vLLM server sharing the jobs' GPUs holds of each)."""
    def fits(largest, per_cell, per_training) -> None:
        if largest is not None:
            check_fit(plans(per_cell, per_training), largest, reserved)
    return fits


def describe(plans: list[JobPlan], nodes: list[dict], largest: tuple[str, int] | None) -> str:
    where = ", ".join(f"{n['node']}: {n['gpus']:g} GPU / {n['cpus']:g} CPU" for n in nodes) or "this machine"
    probes = sum(p.kind == "probe" for p in plans)
    lines = [f"plan: {sum(p.kind == 'train' for p in plans)} training(s), {sum(p.kind == 'cell' for p in plans)} "
             f"cell(s){f', {probes} gradient probe(s)' if probes else ''} to run on {where}"
             + (f"; largest GPU {largest[0]} ({human(largest[1])})" if largest else "")]
    width = max((len(p.name) for p in plans), default=0)
    for p in plans:
        time = "" if p.seconds is None else f"<= {p.seconds * p.gpus / 3600:.2f} GPU-h ({p.seconds:.0f} s)"
        lines.append(f"  {p.name:<{width}}  {p.gpus:g} GPU {p.cpus} CPU  peak ~{human(p.peak)} "
                     f"(weights {human(p.weights)} + {'trace/KV' if p.kind == 'cell' else 'rows'} "
                     f"{human(p.cache)})  {time}".rstrip())
    timed = [p for p in plans if p.seconds is not None]
    hours = sum(p.seconds * p.gpus for p in timed) / 3600
    work = sum(p.seconds for p in timed) / 3600
    lines.append(f"total: at most {hours:.2f} GPU-hours ({work:.2f} hours of jobs) for the {len(timed)} cell(s) "
                 f"with a measured per-token rate (every answer to its cap); {len(plans) - len(timed)} job(s) "
                 "without one")
    return "\n".join(lines)
