"""The text multi-agent chain: upstream agents write text, the final agent reads it.

Same roles and prompts as DiffMAS (``diffmas_eval.prompts``): each upstream agent gets its role
instruction as system message and the bare question as user message, through the model's chat
template. What differs is the message: text (at most ``agent_max_tokens`` tokens per agent, greedy)
instead of latent KV columns.

- ``sequential`` (planner, critic, refiner, ...): agent k also reads agents 1..k-1's texts.
- ``hierarchical`` (math, science, code, ... domain agents): every domain agent reads only the
  question (they run side by side, one batch); the final agent (summarizer) reads them all.

The final agent's text is produced by the lm-eval adapter (``harness/textmas_lm.py``): the note
``text_preamble(trace)`` (the upstream texts) goes before the task prompt, where DiffMAS puts its
one-line note on the latent trace.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..prompts import TEXT_ROLES, TOPOLOGIES, Role, chat_format, text_preamble, text_upstream_user


@dataclass
class AgentText:
    role: str
    text: str
    tokens: int | None
    seconds: float = 0.0  # wall time of the agent's batch, divided by the batch's questions

    def to_dict(self) -> dict:
        return {"role": self.role, "text": self.text, "tokens": self.tokens, "seconds": round(self.seconds, 4)}


@dataclass
class TextTrace:
    question: str
    agents: list[AgentText] = field(default_factory=list)

    def entries(self) -> list[tuple[str, str]]:
        return [(a.role, a.text) for a in self.agents]

    def preamble(self) -> str:
        return text_preamble(self.entries())


class TextChain:
    def __init__(self, backend, tokenizer, roles: list[str], role_map: dict[str, Role] | None = None,
                 topology: str = "sequential", agent_max_tokens: int = 512, enable_thinking: bool | None = None):
        if topology not in TOPOLOGIES:
            raise ValueError(f"topology={topology!r} is not valid; choose one of {', '.join(TOPOLOGIES)}")
        if agent_max_tokens < 1:
            raise ValueError(f"agent_max_tokens must be >= 1, got {agent_max_tokens}")
        self.backend, self.tokenizer, self.roles = backend, tokenizer, list(roles)
        self.role_map = role_map or TEXT_ROLES
        unknown = [r for r in self.roles if r not in self.role_map]
        if unknown:
            raise ValueError(f"unknown role(s) {unknown}; valid roles: {', '.join(sorted(self.role_map))}")
        self.topology, self.agent_max_tokens, self.enable_thinking = topology, int(agent_max_tokens), enable_thinking

    @property
    def upstream(self) -> list[str]:
        return self.roles[:-1]

    def prompt(self, role: str, question: str, earlier: list[tuple[str, str]]) -> str:
        return chat_format(self.tokenizer, self.role_map[role].instruction, text_upstream_user(question, earlier),
                           self.enable_thinking)

    def run(self, questions: list[str]) -> list[TextTrace]:
        """Every upstream agent's text for each question (batched across questions)."""
        traces = [TextTrace(q) for q in questions]
        if not self.upstream or not questions:
            return traces
        if self.topology == "sequential":
            for role in self.upstream:
                t0 = time.perf_counter()
                outs = self.backend.generate([self.prompt(role, t.question, t.entries()) for t in traces],
                                             self.agent_max_tokens)
                per = (time.perf_counter() - t0) / len(traces)
                for t, o in zip(traces, outs):
                    t.agents.append(AgentText(role, o.text, o.tokens, per))
        else:  # hierarchical: all domain agents side by side, each reads the question only
            prompts = [self.prompt(role, t.question, []) for role in self.upstream for t in traces]
            t0 = time.perf_counter()
            outs = self.backend.generate(prompts, self.agent_max_tokens)
            per = (time.perf_counter() - t0) / len(prompts)
            for k, role in enumerate(self.upstream):
                for j, t in enumerate(traces):
                    o = outs[k * len(traces) + j]
                    t.agents.append(AgentText(role, o.text, o.tokens, per))
        return traces
