"""Agent roles and their prompts, shared by DiffMAS and the text-MAS baseline.

Roles differ only by their instructions: one model plays every agent. An upstream agent sees its
role instructions and the bare question; the final agent sees a short note that latent thoughts
precede it, then the task prompt exactly as the benchmark formats it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from jinja2 import TemplateError


@dataclass(frozen=True)
class Role:
    name: str
    instruction: str


def _by_name(*roles: Role) -> dict[str, Role]:
    return {r.name: r for r in roles}


ROLES: dict[str, Role] = _by_name(
    Role("planner", "You are the Planner. Break the question into steps and outline how to solve it. "
                    "Do not give the final answer."),
    Role("critic", "You are the Critic. Check the plan that precedes you for mistakes and gaps, "
                   "and point out how to fix them."),
    Role("refiner", "You are the Refiner. Combine the plan and the critique into an improved, "
                    "step-by-step solution path."),
    Role("solver", "You are the Solver. Earlier agents left latent thoughts before this message; use "
                   "them if they help and ignore them otherwise. Solve the question and state the "
                   "final answer clearly."),
)
# the same agents for code generation (``family=code``): they reason about the program; the final agent writes it
CODE_ROLES: dict[str, Role] = _by_name(
    Role("planner", "You are the Planner for a programming task. Work out what the function must do (inputs, "
                    "outputs, edge cases) and outline an algorithm step by step. Do not write the program."),
    Role("critic", "You are the Critic for a programming task. Check the plan that precedes you against the "
                   "problem and its examples: wrong logic, missed edge cases, off-by-one errors, wrong types. "
                   "Point out how to fix them."),
    Role("refiner", "You are the Refiner for a programming task. Combine the plan and the critique into a "
                    "corrected step-by-step algorithm, precise enough to translate directly into Python."),
    Role("solver", "You are the Coder. Earlier agents left latent thoughts before this message; use them if "
                   "they help and ignore them otherwise. Write a complete, self-contained Python program that "
                   "solves the problem, in one markdown code block."),
)
FAMILIES = ("general", "code")
# the model_args that pick the agents' instructions, in both lm-eval models (``diffmas``, ``textmas``)
ROLE_OPTIONS = {
    "roles": "YAML file 'role: instruction', in agent order; the last one is the final agent",
    "family": "role instructions of a task family: general (default) | code (diffmas-eval codegen sets it)",
}
UPSTREAM_CYCLE = ("planner", "critic", "refiner")
FINAL_ROLE = "solver"
DEFAULT_AGENTS = 4  # planner, critic, refiner, solver
FINAL_PREAMBLE = (
    "[Latent thoughts from the {names} agent(s) precede this text. Use them if they help; "
    "ignore them otherwise.]\n\n"
)


# the hierarchical topology (LatentMAS): independent domain agents, then a summarizer (textmas and diffmas)
TEXT_ROLES: dict[str, Role] = {
    **ROLES,
    **_by_name(
        Role("math", "You are the Math agent. Solve the question with careful mathematical reasoning, "
                     "step by step, and state your answer."),
        Role("science", "You are the Science agent. Solve the question with scientific knowledge and "
                        "reasoning, step by step, and state your answer."),
        Role("code", "You are the Code agent. Solve the question with precise, programmatic step-by-step "
                     "reasoning, and state your answer."),
        Role("summarizer", "You are the Summarizer. The domain agents' answers precede this message; weigh "
                           "them, resolve disagreements, and state the final answer clearly."),
    ),
}
DOMAIN_CYCLE = ("math", "science", "code")
SUMMARIZER_ROLE = "summarizer"
TOPOLOGIES = ("sequential", "hierarchical")
TEXT_NOTE = (
    "[Notes from the {names} agent(s) follow. Use them if they help; ignore them otherwise.]\n\n"
    "{notes}\n\n[End of notes.]\n\n"
)


def family_roles(family: str | None, builtin: dict[str, Role] = ROLES) -> dict[str, Role]:
    """``builtin`` with the role instructions of a task family (``general``: unchanged; ``code``: CODE_ROLES)."""
    family = family or "general"
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not valid; choose one of {', '.join(FAMILIES)}")
    return {**builtin, **CODE_ROLES} if family == "code" else dict(builtin)


def default_roles(agents: int) -> list[str]:
    """``agents`` roles: planner, critic, refiner (critic/refiner repeat beyond 4), solver last."""
    if agents < 1:
        raise ValueError(f"agents must be >= 1, got {agents}")
    upstream = list(UPSTREAM_CYCLE[: agents - 1])
    while len(upstream) < agents - 1:
        upstream.append(UPSTREAM_CYCLE[1 + (len(upstream) - 3) % 2])
    return [*upstream, FINAL_ROLE]


def load_roles(path: str | Path, builtin: dict[str, Role] = ROLES) -> tuple[dict[str, Role], list[str]]:
    """Custom roles from YAML ``{name: instruction, ...}``: the keys, in order, are the agents (the
    last one is the final agent); the roles join the built-in ones."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read roles file {path}: {err}") from err
    if not isinstance(data, dict) or not data or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"{path}: a roles file is a non-empty mapping 'role name: instruction text', "
                         "one line per agent in order, the final agent last")
    return {**builtin, **{k: Role(k, v) for k, v in data.items()}}, list(data)


_SYSTEM_PROBE = ("\x00diffmas-system-probe\x00", "\x00diffmas-user-probe\x00")
_TAKES_SYSTEM: dict[str, bool] = {}


def takes_system(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a system message, decided once per template.

    Some templates refuse one (Gemma: "System role not supported"; Mistral v0.1/v0.2: roles must
    alternate user/assistant), some drop it silently; both get the instructions folded into the user
    turn instead (``chat_messages``). One probe render per distinct template, cached.
    """
    template = tokenizer.chat_template
    key = template if isinstance(template, str) else repr(template)
    if key not in _TAKES_SYSTEM:
        system, user = _SYSTEM_PROBE
        try:
            text = tokenizer.apply_chat_template([{"role": "system", "content": system},
                                                  {"role": "user", "content": user}],
                                                 tokenize=False, add_generation_prompt=True)
            _TAKES_SYSTEM[key] = system in text and user in text
        except TemplateError:
            _TAKES_SYSTEM[key] = False
    return _TAKES_SYSTEM[key]


def chat_messages(tokenizer, system: str, user: str) -> list[dict]:
    """An agent's turn for any template: its instructions as the system message where the template
    takes one, otherwise before the user text in the one user turn (what Gemma's and Mistral's own
    docs do with instructions)."""
    if takes_system(tokenizer):
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return [{"role": "user", "content": f"{system}\n\n{user}"}]


def chat_format(tokenizer, system: str, user: str, enable_thinking: bool | None = None) -> str:
    """The role instructions and the question through the model's chat template (``chat_messages``);
    a model without a template gets a plain-text prompt. The one place every agent's prompt is made."""
    if getattr(tokenizer, "chat_template", None):
        kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        return tokenizer.apply_chat_template(chat_messages(tokenizer, system, user), tokenize=False,
                                             add_generation_prompt=True, **kwargs)
    return f"{system}\n\nQuestion: {user}\n\nAnswer:"


def last_user_turn(messages: list[dict]) -> int | None:
    """Index of a chat's last user message: where the question is, and where the trace note goes."""
    return max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)


def final_preamble(upstream: list[str]) -> str:
    return FINAL_PREAMBLE.format(names=", ".join(upstream)) if upstream else ""


# -- the final agent's prompt: one builder, the one SFT trains ------------------------------------------
def with_note(prompt: str | list[dict], note: str) -> str | list[dict]:
    """The final agent's prompt: the trace note (``final_preamble``) before the task, in the last user turn of a
    chat or before a plain-text prompt. What the trainer gives TRL, ``lm_eval --model diffmas`` puts in the chat
    turn, and ``final_prompt_ids`` tokenizes."""
    if not note:
        return prompt
    if isinstance(prompt, str):
        return note + prompt
    messages = [dict(m) for m in prompt]
    last = last_user_turn(messages)
    if last is None:
        raise ValueError("a conversational prompt needs a user message")
    messages[last]["content"] = note + messages[last]["content"]
    return messages


def question_prompt(tokenizer, question: str) -> str | list[dict]:
    """A bare question as a prompt: one user turn where the tokenizer has a chat template (as ``lm_eval
    --apply_chat_template`` and a conversational SFT row give it), else the question as text."""
    return [{"role": "user", "content": question}] if getattr(tokenizer, "chat_template", None) else question


def final_prompt_ids(tokenizer, upstream: list[str], prompt: str | list[dict],
                     enable_thinking: bool | None = None, *, add_special_tokens: bool = True) -> list[int]:
    """The final agent's prompt tokens exactly as SFT trains them: the note before the task (``with_note``),
    tokenized as TRL tokenizes a prompt (a chat through the template with the generation prompt, text with the
    tokenizer's special tokens). No role instruction: the trainer never gave the final agent one, so neither
    do ``ask``, the gradient probe nor ``lm_eval --model diffmas`` (``tests/test_final_prompt.py`` holds all
    four to the same ids). The note and a text prompt are tokenized as one string: apart, a BPE tokenizer may
    cut the boundary differently (SmolLM2: "\n\n" is one token before "Question" alone, two together).

    ``add_special_tokens=False`` (text prompts): without the tokenizer's special tokens, for a caller that
    places its own BOS (``lm_eval --model diffmas`` keeps lm-eval's)."""
    prompt = with_note(prompt, final_preamble(upstream))
    if isinstance(prompt, str):
        return list(tokenizer(text=prompt, add_special_tokens=add_special_tokens)["input_ids"])
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True,
                                        **kwargs)["input_ids"]
    return list(ids)


# -- which roles play, in which order: one resolution for diffmas and textmas -------------------------
def resolve_roles(family: str | None = None, roles_file: str | None = None, agents: int | None = None,
                  topology: str | None = None, order: list[str] | None = None, *,
                  saved_topology: str | None = None, builtin: dict[str, Role] | None = None,
                  ) -> tuple[dict[str, Role], list[str]]:
    """The role instructions and the agents in order, for ``lm_eval --model diffmas`` and ``textmas`` alike.

    A roles file decides both (``agents``, when given, must match it); else a given ``agents`` or ``topology``
    picks the topology's roles (``saved_topology``, a trained chain's, when only ``agents`` is given; as many
    agents as ``order`` when only the topology is); else ``order`` (a trained chain's saved roles); else the
    default 4 sequential agents. ``family``: the task family's instructions (``family_roles``)."""
    role_map = family_roles(family, TEXT_ROLES if builtin is None else builtin)
    if roles_file:
        role_map, order = load_roles(roles_file, role_map)
        if agents is not None and int(agents) != len(order):
            raise ValueError(f"agents={agents} but the roles file {roles_file} defines {len(order)} agents")
        return role_map, order
    order = list(order) if order else default_roles(DEFAULT_AGENTS)
    if agents is not None or topology is not None:
        order = topology_roles(int(agents) if agents is not None else len(order),
                               topology or saved_topology or "sequential")
    return role_map, order


def topology_roles(agents: int, topology: str = "sequential") -> list[str]:
    """Roles of a text MAS: ``sequential`` is ``default_roles``; ``hierarchical`` is ``agents - 1`` domain
    agents (math, science, code, repeating) and a summarizer last."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology={topology!r} is not valid; choose one of {', '.join(TOPOLOGIES)}")
    if topology == "sequential":
        return default_roles(agents)
    if agents < 1:
        raise ValueError(f"agents must be >= 1, got {agents}")
    return [DOMAIN_CYCLE[i % len(DOMAIN_CYCLE)] for i in range(agents - 1)] + [SUMMARIZER_ROLE]


def text_notes(entries: list[tuple[str, str]]) -> str:
    """Earlier agents' texts, one block per agent: ``[role]`` then its text."""
    return "\n\n".join(f"[{role}]\n{text.strip()}" for role, text in entries)


def text_upstream_user(question: str, earlier: list[tuple[str, str]]) -> str:
    """An upstream text agent's user turn: the bare question, then the earlier agents' texts (if any)."""
    if not earlier:
        return question
    return f"{question}\n\nEarlier agents wrote:\n\n{text_notes(earlier)}"


def text_preamble(entries: list[tuple[str, str]]) -> str:
    """The final text agent's note: the upstream agents' texts, before the task prompt."""
    if not entries:
        return ""
    return TEXT_NOTE.format(names=", ".join(r for r, _ in entries), notes=text_notes(entries))
