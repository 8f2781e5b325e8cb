"""Evaluation protocols: the decoding a leaderboard (or an lm-eval run) uses, checked before compute.

``greedy``: today's default (greedy decoding, one answer per question; the CPU default).
``paper``: the DiffMAS paper's protocol as its text and close readings give it: sampling at
temperature 0.6, top-p 0.95, k = 4 samples per question (pass@1 mean, majority vote, self-consistency),
per-task output caps (those of a public LatentMAS fork aligned to the published logs; MATH-500 has
none there and takes the paper's upper bound of 32,768, which is inferred).

``task_config`` turns a task and a protocol into an lm-eval inline task config that keeps the task's
name: lm-eval's own ``repeats`` (k requests per question), its ``take_first_k`` filter under the
filter name ``none`` (so ``exact_match,none`` stays the headline metric: the mean pass@1 over the k
samples, with its stderr over questions) and a ``majority`` filter (answer extraction, lm-eval's
``majority_vote``, ``take_first``), plus the self-consistency metrics of ``stability.sample_metrics``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import yaml

# the paper's per-task caps, the generative tasks scored per sample (their process_results take k samples;
# tasks/utils.py) and the code tasks: from the one task registry
from .registry import CODE_TASKS, PAPER_CAPS, SAMPLED_TASKS


@dataclass(frozen=True)
class Protocol:
    """One decoding protocol: sampling or not, the samples per question and per-task token caps."""

    name: str
    samples: int = 1
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    caps: dict = field(default_factory=dict)

    def check(self) -> Protocol:
        """Refuse, before any compute, settings that cannot mean what they say."""
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples per question must be an integer >= 1, got {self.samples!r} "
                             "(1: one answer; the paper protocol uses 4)")
        if not self.do_sample and self.temperature not in (None, 0, 0.0):
            raise ValueError(f"temperature={self.temperature} with greedy decoding: greedy ignores the temperature; "
                             "ask for sampling (--protocol paper, or do_sample=True) or drop the temperature")
        if not self.do_sample and self.samples > 1:
            raise ValueError(f"{self.samples} samples per question with greedy decoding would be {self.samples} "
                             "copies of one answer; ask for sampling (--protocol paper) or use 1 sample")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} is outside (0, 1]: it is the probability mass kept (1 = all)")
        if self.temperature is not None and self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} with sampling: it must be > 0 "
                             "(for greedy decoding: --protocol greedy)")
        return self

    def generation(self, task: str, max_gen_toks: int | None) -> dict:
        """The gen_kwargs this protocol sets for ``task`` (``max_gen_toks``: an explicit cap wins)."""
        out: dict = {"do_sample": self.do_sample}
        if self.do_sample:
            out.update(temperature=self.temperature, top_p=self.top_p)
        cap = max_gen_toks or self.caps.get(task)
        if cap:
            out["max_gen_toks"] = int(cap)
        return out

    def as_dict(self) -> dict:
        return asdict(self)


PROTOCOLS = {"greedy": Protocol("greedy"),
             "paper": Protocol("paper", samples=4, do_sample=True, temperature=0.6, top_p=0.95, caps=PAPER_CAPS)}


def get_protocol(name: str, samples: int | None = None, temperature: float | None = None,
                 top_p: float | None = None) -> Protocol:
    """A preset by name, with optional overrides, checked (an unknown name lists the valid ones)."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    base = PROTOCOLS[name]
    changes = {k: v for k, v in (("samples", samples), ("temperature", temperature), ("top_p", top_p))
               if v is not None}
    return Protocol(**{**asdict(base), **changes}).check()


def check_gen_kwargs(kwargs: dict) -> None:
    """A request's gen_kwargs (task YAML + ``--gen_kwargs``), checked by our models before decoding: a
    temperature asked with greedy decoding would be silently ignored, a top-p outside (0, 1] is meaningless."""
    sample = kwargs.get("do_sample")
    temperature, top_p = kwargs.get("temperature"), kwargs.get("top_p")
    if not sample and temperature not in (None, 0, 0.0):
        raise ValueError(f"gen_kwargs temperature={temperature} with do_sample={sample}: greedy decoding ignores the "
                         "temperature; add do_sample=True (sampling) or drop the temperature (greedy)")
    if top_p is not None and not 0 < float(top_p) <= 1:
        raise ValueError(f"gen_kwargs top_p={top_p} is outside (0, 1] (the probability mass kept; 1 = all)")


def is_generative(task: str) -> bool:
    """Whether an lm-eval task (or a code task) generates text, read from its config without loading data."""
    if task in CODE_TASKS or task in SAMPLED_TASKS:
        return True
    return _task_yaml(task).get("output_type", "generate_until") == "generate_until"


def _task_yaml(task: str) -> dict:
    from lm_eval.tasks import TaskManager  # start-up time: lm_eval (the command parsers import this module)

    from ..compat.lm_eval import load_task_yaml  # start-up time: lm_eval, as above

    entry = TaskManager().task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise ValueError(f"unknown lm-eval task {task!r} (not in lm-eval's index or this package's tasks/)")
    return load_task_yaml(entry.yaml_path)


def check_stability_tasks(tasks: list[str]) -> None:
    """Stability metrics need a generated answer: a log-likelihood task has none (refused before compute)."""
    bad = [t for t in tasks if not is_generative(t)]
    if bad:
        raise ValueError(f"{', '.join(bad)}: no generated output (scored by log-likelihood), so no answer to measure "
                         "stability on; use a generative task, e.g. diffmas_arc_challenge_gen / "
                         "diffmas_commonsense_qa_gen (generative: "
                         f"{', '.join([*SAMPLED_TASKS, *CODE_TASKS])})")


def task_config(task: str, protocol: Protocol, max_gen_toks: int | None = None) -> str | dict:
    """What ``simple_evaluate(tasks=[...])`` gets for ``task`` under ``protocol``: the name itself when one
    greedy answer is asked; else the task's own config with lm-eval ``repeats``, filters and metrics."""
    if protocol.samples == 1:
        return task
    if task not in SAMPLED_TASKS:
        raise ValueError(f"{task}: {protocol.samples} samples per question are scored (pass@1 mean, majority, "
                         f"consistency) for this package's generative tasks only: {', '.join(SAMPLED_TASKS)} "
                         "(and the code tasks through codegen --n-samples)")
    cfg = copy.deepcopy(_task_yaml(task))
    cfg.pop("tag", None)
    k = protocol.samples
    cfg["repeats"] = k
    cfg["generation_kwargs"] = {**cfg.get("generation_kwargs", {}), **protocol.generation(task, max_gen_toks)}
    return _with_samples(cfg, k)


def paper_yaml(task: str) -> str:
    """``tasks/<task>_paper.yaml``: the paper protocol for the plain ``lm_eval`` CLI (``--tasks <task>_paper``,
    tag ``diffmas_paper_tasks``), the same settings as ``task_config(task, PROTOCOLS["paper"])``; a test keeps
    the shipped files equal to this."""
    p = PROTOCOLS["paper"]
    kind, k = SAMPLED_TASKS[task], p.samples
    gen = {**_task_yaml(task).get("generation_kwargs", {}), **p.generation(task, None)}
    names = ["exact_match", "consistent", *(f"correct_{j}of{k}" for j in range(k + 1))]
    body = {"repeats": k, "generation_kwargs": gen,
            "filter_list": [{"name": "none", "filter": [{"function": "take_first_k", "k": k}]},
                            {"name": "majority", "filter": [{"function": "custom", "filter_fn": f"@@{kind}"},
                                                            {"function": "majority_vote"},
                                                            {"function": "take_first"}]}],
            "metric_list": [{"metric": n, "aggregation": "mean", "higher_is_better": True} for n in names]}
    text = yaml.safe_dump(body, sort_keys=False, default_flow_style=None, width=120)
    text = text.replace(f"'@@{kind}'", f"!function utils.answers_{kind}")
    return (f"# generated by diffmas_eval.tasks.protocol.paper_yaml: the DiffMAS paper protocol (protocol.py)\n"
            f"include: {task}.yaml\ntask: {task}_paper\ntag: diffmas_paper_tasks\n{text}")


def _with_samples(cfg: dict, k: int) -> dict:
    from . import utils  # start-up time: datasets (tasks.utils imports it), as above

    kind = SAMPLED_TASKS[cfg["task"]]
    cfg["filter_list"] = [
        {"name": "none", "filter": [{"function": "take_first_k", "k": k}]},
        {"name": "majority", "filter": [{"function": "custom", "filter_fn": utils.ANSWER_FILTERS[kind]},
                                        {"function": "majority_vote"}, {"function": "take_first"}]}]
    names = ["exact_match", "consistent", *(f"correct_{j}of{k}" for j in range(k + 1))]
    cfg["metric_list"] = [{"metric": n, "aggregation": "mean", "higher_is_better": True} for n in names]
    return cfg
