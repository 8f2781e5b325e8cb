"""Request handling shared by the ``diffmas`` and ``textmas`` lm-eval models.

- ``check_model_args``: unknown model_args fail with the list of valid ones.
- ``last_user_turn`` / ``group_by_gen_kwargs``: how requests are read and batched.
- ``Accounting``: per-sample accounting (tokens generated per agent, wall time per sample). Each
  record is attached to its lm-eval request after the request is answered, as one extra trailing
  element of the request's arguments, so ``--log_samples`` writes it into the sample log (as
  ``arguments.gen_args_0.arg_2`` for generation, ``arg_2`` of each choice for log-likelihoods); the
  summary goes into the results JSON through ``get_model_info`` (``config.accounting``).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict

ACCOUNTING_KEY = "diffmas_accounting"


def check_model_args(model: str, unknown: dict, options: dict[str, str]) -> None:
    if unknown:
        valid = "\n".join(f"  {k}: {v}" for k, v in options.items())
        raise ValueError(f"unknown {model} model_args {sorted(unknown)}; valid ones:\n{valid}")


def last_user_turn(messages: list[dict]) -> int | None:
    return max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)


def group_by_gen_kwargs(requests) -> dict[str, list[int]]:
    """Request indices grouped by identical generation kwargs (one decoding setup per group)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, req in enumerate(requests):
        groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
    return groups


class Accounting:
    """Per-sample records ``{task, doc_id, agents: [{role, tokens, ...}], tokens, seconds}``."""

    def __init__(self, method: str):
        self.method = method
        self.records: list[dict] = []

    def record(self, request, agents: list[dict], seconds: float, **extra) -> dict:
        """Account one answered request and attach the record to it (for the sample log)."""
        rec = {"method": self.method, "task": getattr(request, "task_name", None),
               "doc_id": getattr(request, "doc_id", None), "agents": agents,
               "tokens": sum(a.get("tokens") or 0 for a in agents), "seconds": round(seconds, 4), **extra}
        self.records.append(rec)
        attach(request, rec)
        return rec

    def summary(self) -> dict:
        """Means per sample, overall and per task: generated tokens (total and per agent), seconds."""
        def summarise(records):
            per_agent: dict[str, list[int]] = defaultdict(list)
            for r in records:
                for a in r["agents"]:
                    per_agent[a["role"]].append(a.get("tokens") or 0)
            return {"samples": len(records),
                    "tokens_per_sample": round(statistics.fmean(r["tokens"] for r in records), 2),
                    "tokens_per_agent": {k: round(statistics.fmean(v), 2) for k, v in per_agent.items()},
                    "seconds_per_sample": round(statistics.fmean(r["seconds"] for r in records), 4),
                    "seconds_total": round(sum(r["seconds"] for r in records), 2)}

        if not self.records:
            return {"method": self.method, "samples": 0}
        by_task: dict[str, list[dict]] = defaultdict(list)
        for r in self.records:
            by_task[str(r["task"])].append(r)
        return {"method": self.method, **summarise(self.records),
                "per_task": {t: summarise(rs) for t, rs in sorted(by_task.items())}}


def attach(request, record: dict) -> None:
    """Append ``{ACCOUNTING_KEY: record}`` to an lm-eval ``Instance``'s arguments (once; replaced on repeats).

    lm-eval logs ``req.args`` in the sample log. The request cache is keyed by the original arguments
    (our models call ``cache_hook.add_partial`` with them before attaching)."""
    if not hasattr(request, "arguments"):
        return
    args = request.args
    if args and isinstance(args[-1], dict) and ACCOUNTING_KEY in args[-1]:
        args = args[:-1]
    request.arguments = (*args, {ACCOUNTING_KEY: record})


def original_args(request) -> tuple:
    """A request's arguments without an attached accounting record."""
    args = request.args
    if args and isinstance(args[-1], dict) and ACCOUNTING_KEY in args[-1]:
        return args[:-1]
    return args
