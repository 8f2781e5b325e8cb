"""Agent roles and their prompts, shared by DiffMAS and the text-MAS baseline.

Roles differ only by their instructions: one model plays every agent. An upstream agent sees its
role instructions and the bare question; the final agent sees a short note that latent thoughts
precede it, then the task prompt exactly as the benchmark formats it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Role:
    name: str
    instruction: str


ROLES: dict[str, Role] = {
    r.name: r
    for r in [
        Role("planner", "You are the Planner. Break the question into steps and outline how to solve it. "
                        "Do not give the final answer."),
        Role("critic", "You are the Critic. Check the plan that precedes you for mistakes and gaps, "
                       "and point out how to fix them."),
        Role("refiner", "You are the Refiner. Combine the plan and the critique into an improved, "
                        "step-by-step solution path."),
        Role("solver", "You are the Solver. Earlier agents left latent thoughts before this message; use "
                       "them if they help and ignore them otherwise. Solve the question and state the "
                       "final answer clearly."),
    ]
}
UPSTREAM_CYCLE = ("planner", "critic", "refiner")
FINAL_ROLE = "solver"
FINAL_PREAMBLE = (
    "[Latent thoughts from the {names} agent(s) precede this text. Use them if they help; "
    "ignore them otherwise.]\n\n"
)


def default_roles(agents: int) -> list[str]:
    """``agents`` roles: planner, critic, refiner (critic/refiner repeat beyond 4), solver last."""
    if agents < 1:
        raise ValueError(f"agents must be >= 1, got {agents}")
    upstream = list(UPSTREAM_CYCLE[: agents - 1])
    while len(upstream) < agents - 1:
        upstream.append(UPSTREAM_CYCLE[1 + (len(upstream) - 3) % 2])
    return [*upstream, FINAL_ROLE]


def load_roles(path: str | Path) -> tuple[dict[str, Role], list[str]]:
    """Custom roles from YAML ``{name: instruction, ...}``: the keys, in order, are the agents (the
    last one is the final agent); the roles join the built-in ones."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read roles file {path}: {err}") from err
    if not isinstance(data, dict) or not data or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"{path}: a roles file is a non-empty mapping 'role name: instruction text', "
                         "one line per agent in order, the final agent last")
    return {**ROLES, **{k: Role(k, v) for k, v in data.items()}}, list(data)


def chat_format(tokenizer, system: str, user: str, enable_thinking: bool | None = None) -> str:
    """The role as system message, the question as user message, through the model's chat template."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    return f"{system}\n\nQuestion: {user}\n\nAnswer:"


def final_preamble(upstream: list[str]) -> str:
    return FINAL_PREAMBLE.format(names=", ".join(upstream)) if upstream else ""
