"""What a leaderboard is made of: methods, tasks, their training families, and the hashes that key each cell.

Every finished piece (an SFT set, an adapter, a scored method x task cell) is stored under a short hash
of exactly the settings that determine it, so a rerun with the same settings reuses it and a changed
setting recomputes only what it touches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any

from ... import DEFAULT_MODEL
from ...latent.config import CHOICES, chain_options
from ...tasks.protocol import get_protocol, is_generative
from ...tasks.registry import CODE_TASKS, DEFAULT_TASKS, FAMILY, PRIMARY
from ...training.data import CHAT_FAMILIES

# the default five, then the paper's baselines and ablations (issue 22), on request (--methods)
DEFAULT_METHODS = ("single", "single-sft", "textmas", "latentmas", "diffmas")
METHODS = (*DEFAULT_METHODS, "stitchmas", "latentmas-hier", "diffmas-hier", "textmas-sft")
# method -> agents it trains with (None: --agents); textmas-sft trains its final agent alone, over the notes
TRAINED = {"single-sft": 1, "diffmas": None, "stitchmas": None, "diffmas-hier": None, "textmas-sft": 1}
TEXT_METHODS = ("textmas", "textmas-sft")
# the latent chain's layout per latent method (diffmas model_args); {} is the sequential, concatenated chain
LAYOUT = {"latentmas": {}, "diffmas": {}, "stitchmas": {"trace": "stitch"},
          "latentmas-hier": {"topology": "hierarchical"}, "diffmas-hier": {"topology": "hierarchical"}}
# the default leaderboard's tasks (lm-eval's, then EvalPlus's code pair: task -> EvalPlus dataset, scored by
# diffmas-eval codegen), and the SFT family (``diffmas-eval sft-data --family``) whose adapter scores a task:
# LatentMAS's and DiffMAS's grouping (math & science reasoning; commonsense multiple choice; code). All from the
# one task registry (``tasks/registry.py``).
LM_EVAL_TASKS = tuple(t for t in DEFAULT_TASKS if t not in CODE_TASKS)
TASKS = (*LM_EVAL_TASKS, *CODE_TASKS)
# the metric a task's column shows in leaderboard.md (the CSV has all of them): PRIMARY, else exact_match
# --recipe: the trainer's settings. "offline": today's short CPU run. "paper": the DiffMAS paper's LoRA r 8 /
# alpha 16, AdamW at 5e-5 with a cosine schedule, gradient accumulation to an effective batch of 64, and
# epochs over the SFT set (10 for the 50 code problems, as the paper says; 1 elsewhere, inferred), on the paper's
# SFT sources (training/data.py: MATH train, CommonsenseQA train, 50 HumanEval problems; offline rows without the hub)
RECIPES = {"offline": {"lr_scheduler": "constant", "effective_batch": None, "epochs": None, "data": "offline"},
           "paper": {"lr_scheduler": "cosine", "effective_batch": 64, "epochs": {"code": 10, "math": 1,
                                                                                   "commonsense": 1},
                     "learning_rate": 5e-5, "lora_r": 8, "lora_alpha": 16, "data": "paper"}}


# the offline recipe's training budget per SFT family, (optimizer steps, batch), where it differs from
# ``--train-steps`` x ``--train-batch-size`` (4 x 1: a pipeline check). The commonsense family is the one a 135M
# model scores above chance, so it gets a budget that moves the model: 100 x 4 is where the trained chain
# separated from the untrained one on this machine (benchmarks/budget.py, docs/leaderboard.md). Math and code
# keep 4 x 1: their columns are a pipeline check at n = 5, and a budget cannot show there.
OFFLINE_BUDGETS = {"commonsense": (100, 4)}


def primary_metric(task: str) -> str:
    return PRIMARY.get(task, "exact_match")


def short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass
class Settings:
    """Everything that determines the numbers of a leaderboard (not where files go, not the batch size)."""

    model: str = DEFAULT_MODEL
    limit: int = 5
    agents: int = 3
    latent_steps: int = 4
    agent_max_tokens: int = 32
    max_gen_toks: int | None = None  # None: the protocol's per-task cap (greedy: 96)
    chat_template: bool = True
    seed: int = 1234
    textmas_args: str = ""
    # training (single-sft and diffmas share all of it; only --agents differs)
    train_steps: int = 4
    train_batch_size: int = 1
    # family -> (steps, batch) overriding the two above for that family (--train-budget FAMILY=STEPSxBATCH)
    train_budgets: dict = field(default_factory=lambda: dict(OFFLINE_BUDGETS))
    learning_rate: float = 3e-4
    lora_r: int = 8
    train_max_length: int = 256
    sft_examples: dict = field(default_factory=dict)  # family -> n (default: sft-data's paper sizes)
    # decoding protocol (protocol.py): greedy (default) or paper, with optional overrides
    protocol: str = "greedy"
    samples: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    recipe: str = "offline"
    limits: dict = field(default_factory=dict)  # task -> n, overriding ``limit`` (--limit TASK=N)
    families: dict = field(default_factory=dict)  # task -> SFT family for tasks FAMILY lacks (--task-family)
    # family -> the source its SFT set really came from (the paper's falls back offline without the hub); set
    # once the sets are built, so an adapter's hash names the data it saw
    sft_sources: dict = field(default_factory=dict)
    # the latent chain's ablation overrides (``diffmas-eval ablate``; CHAIN_KEYS): e.g. {"trace": "overwrite"} or
    # {"stage1_grad": "none"}; they enter the latent methods' cell and adapter hashes only when set
    chain: dict = field(default_factory=dict)
    # --serve vllm (``runner.serve.describe``): the backend, the server's vLLM version and arguments; they enter
    # the hash of every cell whose decoding goes to the server (``route`` below), so served and in-process cells
    # never mix
    serving: dict = field(default_factory=dict)

    def served(self, method: str, task: str) -> bool:
        """Whether this cell's decoding goes to the run's server (``--serve``; ``route`` decides)."""
        if not self.serving:
            return False

        return route(self, method, task) is None

    def family_of(self, task: str) -> str | None:
        return self.families.get(task) or FAMILY.get(task)

    def limit_of(self, task: str) -> int:
        return int(self.limits.get(task, self.limit))

    def budget(self, family: str | None) -> tuple[int, int]:
        """(optimizer steps, batch size) of the family's adapters: ``train_budgets`` where it names the family."""
        steps, batch = self.train_budgets.get(family, (self.train_steps, self.train_batch_size))
        return int(steps), int(batch)

    def decoding(self):
        """The checked ``protocol.Protocol`` of this leaderboard (errors name the valid choices)."""

        return get_protocol(self.protocol, self.samples, self.temperature, self.top_p)

    def answer_cap(self, task: str) -> int:
        """The answer's token budget: ``max_gen_toks`` when set, else the protocol's cap for the task, else 96."""
        return int(self.max_gen_toks or self.decoding().caps.get(task) or 96)

    def recipe_settings(self) -> dict:
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose from {', '.join(RECIPES)}")
        return RECIPES[self.recipe]

    def sft_format(self, family: str) -> str:
        """The SFT rows' format: the one the family's cells are scored in (chat rows when lm-eval applies the chat
        template; the code family is scored by EvalPlus's prompt and trains on plain rows, ``CHAT_FAMILIES``)."""

        return "chat" if self.chat_template and family in CHAT_FAMILIES else "plain"

    def notes(self) -> dict:
        """What makes textmas-sft's notes: the untrained text MAS of ``textmas`` (``training/notes.py``)."""
        return {"agents": self.agents, "agent_max_tokens": self.agent_max_tokens, "textmas_args": self.textmas_args}

    def training(self, method: str, family: str) -> dict:
        """The settings of one adapter: ``trainers/sft.py``'s, i.e. everything the adapter depends on."""
        agents = TRAINED[method] or self.agents
        steps, batch = self.budget(family)
        spec = {"model": self.model, "family": family, "sft_examples": self.sft_examples.get(family),
                **LAYOUT.get(method, {}), **(self.chain if method in LAYOUT else {}), "agents": agents,
                "latent_steps": self.latent_steps if agents > 1 else 0,
                "steps": steps, "batch_size": batch, "learning_rate": self.learning_rate,
                "lora_r": self.lora_r, "max_length": self.train_max_length, "seed": self.seed}
        if method == "textmas-sft":
            spec["notes"] = self.notes()
        if self.sft_format(family) == "chat":  # plain adapters keep their hashes
            spec["sft_format"] = "chat"
        recipe = self.recipe_settings()
        if self.recipe != "offline":  # offline adapters keep their hashes
            epochs = recipe["epochs"][family]
            spec.update(recipe=self.recipe, learning_rate=recipe["learning_rate"], lora_r=recipe["lora_r"],
                        lora_alpha=recipe["lora_alpha"], lr_scheduler=recipe["lr_scheduler"], epochs=epochs,
                        steps=None, accumulation=max(1, recipe["effective_batch"] // batch),
                        sft_source=self.sft_sources.get(family, recipe["data"]))
        return spec

    def cell(self, method: str, task: str) -> dict:
        """The settings of one method x task cell (an adapter's own settings included)."""
        spec = {"model": self.model, "method": method, "task": task, "limit": self.limit_of(task),
                "max_gen_toks": self.answer_cap(task), "chat_template": self.chat_template, "seed": self.seed}
        if self.protocol != "greedy" or self.samples or self.temperature or self.top_p:  # greedy cells keep their hash
            spec["protocol"] = self.decoding().as_dict()
        if method in TEXT_METHODS or method in LAYOUT:
            spec["agents"] = self.agents
        if method in LAYOUT:
            spec.update(latent_steps=self.latent_steps, **LAYOUT[method], **self.chain)  # {}: hashes kept
        if method in TEXT_METHODS:
            spec.update(agent_max_tokens=self.agent_max_tokens, textmas_args=self.textmas_args)
        if method in TRAINED:
            spec["training"] = self.training(method, self.family_of(task))
        if self.served(method, task):  # in-process cells keep their hashes
            spec["serving"] = self.serving
        return spec

    def as_dict(self) -> dict:
        return asdict(self)

    def check_chain(self) -> None:
        """The ablation overrides name known options with valid values (errors list them)."""

        for key, value in self.chain.items():
            if key not in CHAIN_KEYS:
                raise ValueError(f"unknown chain override {key!r}; choose from {', '.join(CHAIN_KEYS)}")
            valid = CHOICES.get(key, (True, False))
            if value not in valid:
                raise ValueError(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, valid))}")


# what an ablation may change in a latent method besides agents and latent steps: the trace layout, whether stage 1
# is trained through, and whether the realignment W_a is trained with the LoRA (scoring reads it from the adapter)
CHAIN_KEYS = ("trace", "stage1_grad", "train_realign")


def method_model_args(method: str, pretrained: str, agents: int, latent_steps: int, agent_max_tokens: int = 512,
                      textmas_args: str = "", adapter: str | None = None,
                      chain: dict | None = None, served=None, seed: int | None = None) -> tuple[str, str]:
    """The lm-eval model name and ``model_args`` of a leaderboard method (``adapter``: its trained LoRA;
    ``chain``: ``Settings.chain``, of which only ``trace`` is a scoring option; ``served``: a ``serve.Served``, the
    server its decoding goes to (``--serve``), with ``seed`` each sampled request's seed derives from)."""
    if method in TRAINED and not adapter:
        raise ValueError(f"method {method!r} needs its trained adapter")
    # the request timeout follows the cell's token budget (``serve.request_timeout``): never part of a hash
    timeout = f",timeout={served.timeout:g}" if served is not None and getattr(served, "timeout", None) else ""
    text_server = (f",backend=openai,base_url={served.url},model={served.model},num_concurrent={served.concurrency}"
                   + timeout + (f",seed={seed}" if seed is not None else "")) if served else ""
    if method in ("single", "single-sft"):  # textmas at agents=1: lm-eval's hf exactly, plus stability metrics
        peft = f",peft={adapter}" if method == "single-sft" and not served else ""  # served: the LoRA's name
        return "textmas", f"pretrained={pretrained},agents=1{peft}{text_server}"
    if method in LAYOUT:
        peft = f",peft={adapter}" if method in TRAINED else ""  # stage 1 runs in process, served or not
        layout = {"trace": "concat", **LAYOUT[method], **{k: v for k, v in (chain or {}).items() if k == "trace"}}
        stage2 = (f",stage2=vllm,base_url={served.url},served_model={served.model},num_concurrent="
                  f"{served.concurrency}" + timeout + (f",seed={seed}" if seed is not None else "")) if served else ""
        return "diffmas", (f"pretrained={pretrained},agents={agents},latent_steps={latent_steps},realign=ridge,"
                           + ",".join(f"{k}={v}" for k, v in layout.items()) + peft + stage2)
    if method in TEXT_METHODS:
        extra = f",{textmas_args}" if textmas_args else ""
        peft = f",peft={adapter}" if method == "textmas-sft" and not served else ""
        return "textmas", (f"pretrained={pretrained},agents={agents},agent_max_tokens={agent_max_tokens}{extra}{peft}"
                           + text_server)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def chain_defaults() -> dict[str, Any]:
    """The leaderboard's own defaults for the chain options it offers (``chain_options(front="leaderboard")``):
    ``Settings``' CPU-sized chain, which its flags and README's option reference show."""

    return {o.name: getattr(Settings(), o.name) for o in chain_options(front="leaderboard")}


def parse_list(text: str, allowed: tuple[str, ...] | None, what: str) -> list[str]:
    """A comma-separated option, checked against ``allowed`` (None: anything)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"--{what} is empty")
    if allowed is not None:
        bad = [x for x in items if x not in allowed]
        if bad:
            raise ValueError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


# -- what goes to a --serve server ------------------------------------------------------------------------------
# -- what goes to the server --------------------------------------------------------------------------------------
@cache
def _generative(task: str) -> bool:
    return is_generative(task)


def route(settings: Settings, method: str, task: str) -> str | None:
    """None when a cell's decoding goes to the server; otherwise why it stays in process."""
    if not _generative(task):
        return f"{task} is scored by log-likelihood, which stays in process"
    if method in LAYOUT:
        layout = {**LAYOUT[method], **settings.chain}
        trace, topology = layout.get("trace", "concat"), layout.get("topology", "sequential")
        if topology != "sequential" or trace != "concat":
            what = "a hierarchical chain" if topology != "sequential" else f"the {trace} trace"
            return (f"{method}: {what} is not one causal sequence of input embeddings (stage2=vllm needs trace=concat "
                    "and topology=sequential), so its final agent decodes in process")
        return None
    if method in TEXT_METHODS or method in ("single", "single-sft"):
        return None
    return f"{method} has no served route"
