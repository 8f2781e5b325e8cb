"""One question through a DiffMAS chain (``diffmas-eval ask``), as functions that return what the command prints.

``build_chain`` loads a model into an ``AgentChain`` (with ``peft``, the chain the adapter was trained with:
``latent.persist.load_trained_chain``); ``ask`` runs stage 1 (the latent trace) and stage 2 (the
final agent's answer) and returns the answer with its trace and timings. The command only parses flags and
prints; a script or notebook gets the same numbers without scraping text, and can reuse one loaded chain for
many questions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import DEFAULT_MODEL
from .latent import AgentChain, LatentConfig, LatentTrace
from .latent.persist import TrainedChain, load_trained_chain
from .models import load_model


@dataclass
class Answer:
    """The final agent's answer to one question, the trace it read, and how long each stage took."""

    question: str
    text: str
    token_ids: list[int]  # the answer's generated tokens
    trace: LatentTrace  # its ``table()``: per-agent prompt/latent positions and bytes
    stage1_seconds: float
    stage2_seconds: float


def build_chain(model: str = DEFAULT_MODEL, config: LatentConfig | None = None, *, peft: str | None = None,
                dtype: str = "auto", device: str | None = None, seed: int = 0, **options) -> AgentChain:
    """The chain over ``model`` (hub id, local path or ``bundled:NAME``; ``peft``: an adapter on top, a folder or a
    Hub repo id).

    The chain is the trained one (``latent.persist.load_trained_chain``: the adapter's saved agents, latent steps,
    trace and trained realignment), with ``options`` (chain options by name, None: not given) overriding it, as
    ``lm_eval --model diffmas`` builds it. ``config``: a whole configuration instead, used as given (its
    realignment still the trained one when the modes match). ``seed`` seeds torch before the model loads, as the
    command always has, so a run is reproducible.
    """
    if config is not None and options:
        raise ValueError(f"give a config or chain options, not both (got {sorted(options)})")
    if config is not None:
        trained = load_trained_chain(peft, config_class=type(config), realign=config.realign)
        trained.config = config
    else:
        trained = load_trained_chain(peft, **options)
    return build_trained(trained, model, dtype=dtype, device=device, seed=seed)


def build_trained(trained: TrainedChain, model: str = DEFAULT_MODEL, *, dtype: str = "auto",
                  device: str | None = None, seed: int = 0) -> AgentChain:
    """The chain of an already loaded ``trained`` (``load_trained_chain``'s result) over ``model``, its adapter on
    top: what ``build_chain`` does after loading it (``diffmas-eval ask`` loads it once, to check its options
    before the model loads)."""
    torch.manual_seed(seed)
    model_, tokenizer = load_model(model, dtype=dtype, device=device, peft=trained.adapter)
    return trained.build(model_, tokenizer)


def ask(chain: AgentChain, question: str, max_new_tokens: int = 256) -> Answer:
    """Stage 1 over ``question`` (its budget checked with the final agent's prompt and ``max_new_tokens``
    before any compute), then the final agent's greedy answer."""
    final = chain.final_prompt(question)
    with torch.no_grad():
        t0 = time.perf_counter()
        trace = chain.stage1([question], final_tokens=[len(final) + max_new_tokens])
        t1 = time.perf_counter()
        answer = chain.generate(trace, [final], max_new_tokens=max_new_tokens)[0]
        t2 = time.perf_counter()
    return Answer(question, answer.text, list(answer.token_ids), trace, t1 - t0, t2 - t1)


def format_trace_table(trace: LatentTrace) -> str:
    """The trace's per-agent table as the command prints it (the last line: the whole trace)."""
    rows = trace.table()
    lines = [f"{'agent':<10} {'prompt':>7} {'latent':>7} {'positions':>10} {'bytes':>12}"]
    for r in rows:
        note = "" if r["kept"] else "  (dropped: overwrite)"
        lines.append(f"{r['agent']:<10} {r['prompt']:>7} {r['latent']:>7} {r['positions']:>10} {r['bytes']:>12,}{note}")
    lines.append(f"{'trace':<10} {'':>7} {'':>7} {trace.length:>10} {trace.nbytes:>12,}")
    return "\n".join(lines)
