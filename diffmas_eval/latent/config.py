"""The knobs of a DiffMAS chain, validated so a typo fails loudly with the valid choices.

``LatentConfig`` is also the one schema of the chain's user-facing options: each such field carries its
help, its choices and the front ends it appears in as field metadata (``option``), and ``chain_options``
turns them, with the ``agents`` pseudo-option, into ``ChainOption`` records. Every front end is generated
from those records (``lm_eval --model diffmas`` model_args and their typo message, ``diffmas-eval ask``
flags, the TRL ``DiffMASArguments`` of ``trainers/sft.py``), so a new option, a new choice or a changed
default is written once, here, and cannot drift between them.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from ..prompts import DEFAULT_AGENTS, TEXT_ROLES, TOPOLOGIES, default_roles, topology_roles

CHOICES = {
    "realign": ("ridge", "identity", "none"),
    "trace": ("concat", "overwrite", "stitch"),
    "topology": TOPOLOGIES,
    "stage1_grad": ("full", "none"),
    "realign_target": ("embedding_output", "weight_rows"),
    "latent_dtype": ("model", "float32"),
}

# The front ends an option can appear in: lm-eval model_args (``harness/diffmas_lm.py``), the flags of
# ``diffmas-eval ask`` (``cli.py``), the TRL arguments of SFT (``training/sft.py``), and the flags of
# ``diffmas-eval leaderboard`` and ``diffmas-eval memory``. The last two take only the chain's shape (agents,
# latent steps): the leaderboard's methods fix every other option (its cells' hashes hold them), and the
# memory estimate is of the ``trace=concat`` trace, which depends on nothing else. An option is offered where
# a chain is built (``CHAIN_FRONTS``) unless it says otherwise.
FRONT_ENDS = ("lm_eval", "ask", "sft", "leaderboard", "memory")
CHAIN_FRONTS = ("lm_eval", "ask", "sft")
AGENTS_HELP = ("number of agents, final agent included (sequential: planner, critic, refiner, ..., solver; "
               "hierarchical: domain agents, then a summarizer)")


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
           fronts: tuple[str, ...] = CHAIN_FRONTS, saved: bool = False) -> Any:
    """A user-facing ``LatentConfig`` field: its default and the metadata ``chain_options`` reads.

    ``help``: one line, naming every choice (``tests/test_schema.py`` checks that), without the default
    (each front end shows the default its own way). ``fronts``: where the option is offered (an
    inference-only option is not an SFT flag, a training-only one not an eval model_arg). ``saved``: a
    trained chain's value (``diffmas.json``, ``latent/persist.py``) applies at evaluation when the option is
    not given, because the adapter learned to read that trace; run-time limits and precision are not
    inherited.
    """
    return field(default=default, metadata={"help": help, "choices": choices, "fronts": fronts, "saved": saved})


@dataclass(frozen=True)
class ChainOption:
    """One user-facing chain option, as every front end needs it.

    ``type``: the scalar a command-line or model_args text parses to (``int``, ``str``, ``bool``, ``float``);
    ``optional``: ``None`` is a valid value (meaning: no limit / the model's own default).
    """

    name: str
    type: type
    default: Any
    choices: tuple[str, ...] | None
    help: str
    fronts: tuple[str, ...] = CHAIN_FRONTS
    saved: bool = False
    optional: bool = False

    @property
    def annotation(self) -> Any:
        """The field type a dataclass front end (TRL's parser) declares."""
        return self.type | None if self.optional else self.type

    def parse(self, value: Any) -> Any:
        """``value`` as this option's type: text from a command line or model_args, or a value as is."""
        if not isinstance(value, str) or self.type is str:
            return value
        if self.type is bool:
            lowered = value.strip().lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError(f"{self.name}={value!r} is not a boolean; use true or false")
        try:
            return self.type(value)
        except ValueError:
            raise ValueError(f"{self.name}={value!r} is not a valid {self.type.__name__}") from None

    def describe(self) -> str:
        """The one-line help with the default, as lm-eval's model_args list shows it."""
        return self.help if self.default is None else f"{self.help} (default {self.default})"


@dataclass
class LatentConfig:
    """``roles``: every agent in order, the last one is the final agent (default: 4 agents).

    ``latent_steps`` (m): latent thoughts each upstream agent appends after its prompt.
    ``realign``: how a last-layer hidden state becomes an input embedding (LatentMAS ridge map).
    ``realign_target``: what a latent vector must look like: ``embedding_output``, what the model's
    input-embedding module feeds the first layer for a token (its scale included: Gemma); or
    ``weight_rows``, the embedding matrix as is (chains saved before the target existed).
    ``trace``: ``concat`` keeps every segment; ``overwrite`` keeps only the latest agent's (ablation);
    ``stitch`` keeps every segment but builds each without seeing the others (StitchMAS: agents that do not
    condition on each other, only more latent context for the final agent).
    ``topology``: ``sequential`` (planner, critic, refiner, ...: each agent reads the trace so far) or
    ``hierarchical`` (LatentMAS's: math, science, code domain agents, each over the question alone, then a
    summarizer that reads them all). Hierarchical and stitch share one mechanism (``independent``).
    ``stage1_grad``: ``none`` runs stage 1 without autograd (cheaper; no learning to communicate).
    ``max_trace_tokens``: refuse (before any compute) a stage-1 trace longer than this.
    ``checkpoint_agents``: recompute each agent's forward in backward (activation checkpointing).
    ``checkpoint_final``: recompute the final agent's forward in backward too, one decoder layer at a time (a
    long completion's activations are the largest of a step; its layers' outputs are kept, their insides not).
    ``latent_dtype``: ``model`` runs stage 1 in the model's dtype; ``float32`` runs a half-precision
    model's stage 1 (prompts, latent steps, realignment, feedback) with its weights upcast to float32,
    then casts the trace to the model's dtype for stage 2: the latent loop can amplify bf16 rounding
    (``benchmarks/precision.py``). Costs 2x the half-precision weight memory during stage 1 and
    float32 speed; inference only (stage 1 without autograd).

    The fields declared with ``option`` are the user-facing ones (``chain_options``); the others are set by
    code: ``roles`` from ``agents``/``topology`` (or a roles file), ``checkpoint_agents`` by the trainer from
    ``gradient_checkpointing``, ``realign_lambda`` is the paper's constant, ``realign_target`` comes from a saved chain.
    """

    roles: list[str] = field(default_factory=lambda: default_roles(DEFAULT_AGENTS))
    latent_steps: int = option(10, "latent thoughts per upstream agent", fronts=FRONT_ENDS, saved=True)
    realign: str = option("ridge", "ridge (LatentMAS's ridge map, output to input embeddings) | identity | none",
                          choices=CHOICES["realign"], saved=True)
    trace: str = option("concat", "concat | overwrite (keep the latest segment) | stitch (StitchMAS: each upstream "
                        "segment built without seeing the others)", choices=CHOICES["trace"], saved=True)
    topology: str = option("sequential", "sequential (planner, critic, refiner, ...: each agent reads the trace so "
                           "far) | hierarchical (math, science, code domain agents over the question alone, then a "
                           "summarizer)", choices=CHOICES["topology"], saved=True)
    stage1_grad: str = option("full", "full | none (no gradient through stage 1)", choices=CHOICES["stage1_grad"],
                              fronts=("sft",))
    max_trace_tokens: int | None = option(None, "refuse a latent trace longer than this")
    checkpoint_agents: bool = False
    checkpoint_final: bool = option(False, "recompute the final agent's forward in backward, one decoder layer at a "
                                    "time (a long completion's activations are a step's largest)", fronts=("sft",))
    realign_lambda: float = 1e-5
    realign_target: str = field(default="embedding_output", metadata={"saved": True})
    enable_thinking: bool | None = option(None, "passed to every agent's chat template (Qwen3; as with hf, needs "
                                          "think_end_token)", fronts=("lm_eval",))
    latent_dtype: str = option("model", "model | float32: a bf16/float16 model's stage 1 in float32 (each module's "
                               "weights cast for its own call: one module's float32 copy at a time; "
                               "docs/gpus.md, 'What dtype and batching can and cannot change')",
                               choices=CHOICES["latent_dtype"], fronts=("lm_eval",))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # the schema's choices (a subclass's options too), then CHOICES
            valid = f.metadata.get("choices") or CHOICES.get(f.name)
            if valid and getattr(self, f.name) not in valid:
                raise ValueError(f"{f.name}={getattr(self, f.name)!r} is not valid; choose one of {', '.join(valid)}")
        if not self.roles:
            raise ValueError("a chain needs at least one agent (the final agent)")
        if self.latent_steps < 0:
            raise ValueError(f"latent_steps must be >= 0, got {self.latent_steps}")
        if self.topology == "hierarchical" and self.trace == "overwrite":
            raise ValueError("topology=hierarchical needs every domain agent's segment for the summarizer: use "
                             "trace=concat (or stitch, the same for this topology), not overwrite")
        if self.max_trace_tokens is not None and self.max_trace_tokens <= 0:
            raise ValueError(f"max_trace_tokens must be positive, got {self.max_trace_tokens}")

    @property
    def upstream(self) -> list[str]:
        return list(self.roles[:-1])

    @property
    def independent(self) -> bool:
        """Each upstream segment is built over the question alone (the others masked out): stitch, hierarchical."""
        return self.trace == "stitch" or self.topology == "hierarchical"

    def check_roles(self, known: dict = TEXT_ROLES) -> None:
        unknown = [r for r in self.roles if r not in known]
        if unknown:
            raise ValueError(f"unknown role(s) {unknown}; valid roles: {', '.join(sorted(known))} "
                             "(or add your own with a roles YAML file)")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LatentConfig:
        """Build from user-facing options; ``agents=N`` picks the N roles of the topology."""
        values = dict(values)
        names = {f.name for f in dataclasses.fields(cls)} | {"agents"}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown DiffMAS option(s) {unknown}; valid options: {', '.join(sorted(names))}")
        agents = values.pop("agents", None)
        if agents is not None and "roles" not in values:
            values["roles"] = topology_roles(int(agents), values.get("topology", "sequential"))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def chain_options(config_class: type[LatentConfig] = LatentConfig, front: str | None = None) -> list[ChainOption]:
    """The user-facing chain options of ``config_class`` (``LatentConfig`` or a subclass that adds some), in
    order: ``agents`` first (it picks ``roles`` with the topology), then every field declared with ``option``.
    ``front``: only those offered there (one of ``FRONT_ENDS``).

    User-facing today: agents and latent_steps everywhere; realign, trace, topology, max_trace_tokens
    wherever a chain is built (lm-eval, ask, SFT); stage1_grad and checkpoint_final for SFT only (evaluation
    runs without autograd); enable_thinking and latent_dtype for lm-eval only. Not user-facing: roles,
    checkpoint_agents, realign_lambda, realign_target.
    """
    hints = typing.get_type_hints(config_class)
    options = [ChainOption("agents", int, DEFAULT_AGENTS, None, AGENTS_HELP, FRONT_ENDS)]
    for f in dataclasses.fields(config_class):
        if "help" not in f.metadata:
            continue
        args = typing.get_args(hints[f.name])
        scalar = next((a for a in args if a is not type(None)), hints[f.name])
        choices = f.metadata.get("choices")
        options.append(ChainOption(f.name, scalar, f.default, tuple(choices) if choices else None,
                                   f.metadata["help"], tuple(f.metadata.get("fronts", CHAIN_FRONTS)),
                                   bool(f.metadata.get("saved")), type(None) in args))
    return [o for o in options if front is None or front in o.fronts]


def saved_fields(config_class: type[LatentConfig] = LatentConfig) -> list[str]:
    """The fields whose value in a saved chain (``diffmas.json``) applies when not given (``option(saved=)``);
    ``roles`` is not among them: a front end resolves it with ``agents``, ``topology`` or a roles file."""
    return [f.name for f in dataclasses.fields(config_class) if f.metadata.get("saved")]
