"""The knobs of a DiffMAS chain, validated so a typo fails loudly with the valid choices."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..prompts import TEXT_ROLES, TOPOLOGIES, default_roles, topology_roles

CHOICES = {
    "realign": ("ridge", "identity", "none"),
    "trace": ("concat", "overwrite", "stitch"),
    "topology": TOPOLOGIES,
    "stage1_grad": ("full", "none"),
    "realign_target": ("embedding_output", "weight_rows"),
    "latent_dtype": ("model", "float32"),
}


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
    ``latent_dtype``: ``model`` runs stage 1 in the model's dtype; ``float32`` runs a half-precision
    model's stage 1 (prompts, latent steps, realignment, feedback) with its weights upcast to float32,
    then casts the trace to the model's dtype for stage 2: the latent loop can amplify bf16 rounding
    (``benchmarks/precision.py``). Costs 2x the half-precision weight memory during stage 1 and
    float32 speed; inference only (stage 1 without autograd).
    """

    roles: list[str] = field(default_factory=lambda: default_roles(4))
    latent_steps: int = 10
    realign: str = "ridge"
    trace: str = "concat"
    topology: str = "sequential"
    stage1_grad: str = "full"
    max_trace_tokens: int | None = None
    checkpoint_agents: bool = False
    realign_lambda: float = 1e-5
    realign_target: str = "embedding_output"
    enable_thinking: bool | None = None
    latent_dtype: str = "model"

    def __post_init__(self) -> None:
        for key, valid in CHOICES.items():
            if getattr(self, key) not in valid:
                raise ValueError(f"{key}={getattr(self, key)!r} is not valid; choose one of {', '.join(valid)}")
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
