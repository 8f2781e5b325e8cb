"""Request handling shared by the ``diffmas`` and ``textmas`` lm-eval models.

- ``check_model_args``: routes model_args that are not the model's own to lm-eval's ``HFLM`` (every
  parameter of ``HFLM.__init__``, read from its signature at runtime, plus the everyday keywords that
  ``HFLM`` forwards to ``from_pretrained``); anything else fails with the list of valid ones.
- ``group_by_gen_kwargs``: how requests are batched.
- ``Accounting``: per-sample accounting (tokens generated per agent, wall time per sample, and each
  generated answer's stability statistics, ``stability.py``; their means per task go into the results
  JSON as ``config.stability``). Records
  are keyed by (task, prompt hash), the two things lm-eval's sample log identifies a sample by; the
  plugin (``plugin._log_accounting``) adds each sample's record as the field ``diffmas_accounting``
  when lm-eval writes ``samples_<task>_*.jsonl`` (``--log_samples``), for runs of our models. In
  Python, ``add_accounting(task, results["samples"][task], lm.accounting)`` does the same, right after
  the run. Where lm-eval gives no handle on the model, one module-level reference remains (``LATEST``,
  the latest ``diffmas``/``textmas`` model's records): ``lm_eval`` creates the model inside
  ``cli_evaluate`` and calls ``EvaluationTracker.save_results_samples(task, samples)`` with neither the
  model nor anything that names it, so the plugin's hook can reach the records only that way (and a
  Python caller that passes a model string to ``simple_evaluate`` has no model object either). Nothing
  is written onto lm-eval's objects: which requests were accounted is kept by the ``Accounting``.
  The summary goes into the results JSON through ``get_model_info`` (``config.accounting``).
- ``DataParallel`` / ``Accounting.gather``: ``accelerate launch -m lm_eval`` on any device.
  HFLM shards requests by rank only when it sees more than one GPU; on CPU (gloo) or one shared GPU
  every process would score everything. Each rank's accounting is gathered to rank 0 at lm-eval's
  barrier after each request type, and lm-eval's padding copies (ranks get equal request counts)
  are not accounted.
"""

from __future__ import annotations

import inspect
import json
import statistics
import weakref
from collections import defaultdict

from lm_eval.models.huggingface import HFLM
from lm_eval.utils import hash_string

from ..stability import summarise

ACCOUNTING_KEY = "diffmas_accounting"


# Keywords HFLM does not name but passes on, through its ``**kwargs``, to ``from_pretrained``. The
# everyday ones are accepted by name (a typo must still fail, so ``**kwargs`` is not a free pass).
FROM_PRETRAINED = {
    "attn_implementation": "eager | sdpa | flash_attention_2 | ...",
    "device_map": "where each module goes (with parallelize=True)",
    "max_memory": "per-device memory limits for device_map",
    "load_in_4bit": "bitsandbytes 4-bit quantization",
    "load_in_8bit": "bitsandbytes 8-bit quantization",
    "bnb_4bit_compute_dtype": "bitsandbytes 4-bit compute dtype",
    "bnb_4bit_quant_type": "bitsandbytes 4-bit type (nf4 | fp4)",
    "bnb_4bit_use_double_quant": "bitsandbytes nested quantization",
    "variant": "weights file variant (e.g. fp16)",
    "use_safetensors": "load only safetensors weights",
    "cache_dir": "hub download cache",
    "local_files_only": "never download",
    "token": "hub token",
    "force_download": "download even if cached",
    "use_kernels": "hub kernels",
}


def hf_parameters() -> dict[str, object]:
    """``HFLM.__init__``'s named parameters and their defaults, read now (a newer lm-eval's come along)."""
    params = inspect.signature(HFLM.__init__).parameters.values()
    return {p.name: p.default for p in params
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def hf_argument_names() -> set[str]:
    """Every model_arg ``--model hf`` takes by name: HFLM's parameters and ``FROM_PRETRAINED``."""
    return set(hf_parameters()) | set(FROM_PRETRAINED)


def valid_model_args(options: dict[str, str], hf: bool = True) -> str:
    """The list an error shows: our own options first (one line of help each), then lm-eval ``hf``'s."""
    lines = [f"  {k}: {v}" for k, v in options.items()]
    if hf:
        theirs = {k: v for k, v in hf_parameters().items() if k not in options}
        empty = inspect.Parameter.empty
        lines.append("lm-eval hf (HFLM) arguments, passed to HFLM unchanged:")
        lines += [f"  {k}" + ("" if v is empty else f" (default {v!r})") for k, v in theirs.items()]
        lines.append("from_pretrained keywords, passed on by HFLM:")
        lines += [f"  {k}: {v}" for k, v in FROM_PRETRAINED.items() if k not in options]
    return "\n".join(lines)


def check_model_args(model: str, extra: dict, options: dict[str, str], hf: bool | str = True) -> dict:
    """Route the model_args that ``model``'s own signature did not take (``extra``).

    ``hf=True``: those HFLM takes are returned, to be passed to HFLM unchanged. ``hf="backend=hf"``:
    the model has no HFLM now, so an HFLM argument is an error that says where it applies. Anything
    else is unknown: an error with the full list (``valid_model_args``).
    """
    names = hf_argument_names()
    unknown = sorted(k for k in extra if k not in names)
    if unknown:
        raise ValueError(f"unknown {model} model_args {unknown}; valid ones:\n{valid_model_args(options)}")
    if extra and hf is not True:
        raise ValueError(f"{model} model_args {sorted(extra)} are lm-eval hf (HFLM) arguments; they apply to "
                         f"{hf} only: drop them, or use {hf}")
    return dict(extra)


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
        self.by_sample: dict[tuple[str, str], dict] = {}
        self._sent, self._unsent = 0, []  # what ``gather`` has not sent to rank 0 yet
        # times each request was accounted, by identity (lm-eval's Instances are unhashable dataclasses), beside a
        # weak reference to it: an entry leaves with its request, so a model used for many runs holds no old
        # requests and a new object at a freed address starts at 0
        self._seen: dict[int, tuple[weakref.ref | object, int]] = {}
        LATEST["by_sample"] = self.by_sample  # a new model starts a new run (see the module docstring)

    def record(self, request, agents: list[dict], seconds: float, stability: dict | None = None, **extra) -> dict:
        """Account one answered request (one sample) and register the record for the sample log.

        A request seen more often than its ``repeats`` is one of lm-eval's padding copies (data
        parallel runs give every rank as many requests as the busiest one): it is not counted again.
        ``stability``: the answer's ``AnswerStats.record()``. The sample log keeps one list of them per
        sample, in the order of lm-eval's ``resps`` (a task with ``repeats: k`` sends the same request
        k times in a row, and each answer is recorded in turn).
        """
        seen = self.times_accounted(request)
        if seen and seen >= (getattr(request, "repeats", 1) or 1):
            return self.by_sample.get(sample_key(getattr(request, "task_name", None), request.args[0]), {})
        if hasattr(request, "args"):
            self._count(request, seen + 1)
        rec = {"method": self.method, "task": getattr(request, "task_name", None),
               "doc_id": getattr(request, "doc_id", None), "agents": agents,
               "tokens": sum(a.get("tokens") or 0 for a in agents), "seconds": round(seconds, 4), **extra}
        if stability is not None:
            rec["stability"] = stability
        self.records.append(rec)
        logged = self._logged(request) if seen else None
        if logged is not None and stability is not None:  # another sample of a repeated request
            logged.setdefault("stability", []).append(stability)
        else:
            self.register(request, {**rec, "stability": [stability]} if stability is not None else rec)
        return rec

    def times_accounted(self, request) -> int:
        ref, n = self._seen.get(id(request), (None, 0))
        return n if (ref() if isinstance(ref, weakref.ref) else ref) is request else 0

    def _count(self, request, n: int) -> None:
        key = id(request)
        try:
            ref: weakref.ref | object = weakref.ref(request, lambda _, k=key: self._seen.pop(k, None))
        except TypeError:  # an object without weak references (a test's stand-in): held for the model's life
            ref = request
        self._seen[key] = (ref, n)

    def _logged(self, request) -> dict | None:
        args = getattr(request, "args", None)
        if not (args and isinstance(args[0], str)):
            return None
        return self.by_sample.get(sample_key(getattr(request, "task_name", None), args[0]))

    def register(self, request, record: dict) -> None:
        """Remember ``record`` as the accounting of the sample that ``request`` (an Instance) belongs to."""
        args = getattr(request, "args", None)
        if args and isinstance(args[0], str):
            key = sample_key(getattr(request, "task_name", None), args[0])
            self.by_sample[key] = record
            self._unsent.append(key)

    def gather(self, lm) -> None:
        """Collect every rank's new records on rank 0 (a collective: all ranks must call it)."""
        if getattr(lm, "world_size", 1) <= 1:
            return
        mine = (self.records[self._sent:], [(k, self.by_sample[k]) for k in self._unsent])
        self._sent, self._unsent = len(self.records), []
        gathered = lm.gather_object(mine, dst=0)
        if lm.rank != 0:
            return
        for records, keyed in gathered[1:]:
            self.records.extend(records)
            self.by_sample.update(keyed)
        self._sent = len(self.records)

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


    def stability(self) -> dict:
        """Per task, the means of the generated answers' stability statistics (``stability.summarise``)."""
        by_task: dict[str, list[dict]] = defaultdict(list)
        for r in self.records:
            if r.get("stability") is not None:
                by_task[str(r["task"])].append(r["stability"])
        return {"per_task": {t: summarise(rs) for t, rs in sorted(by_task.items())}}


LATEST: dict[str, dict] = {"by_sample": {}}


class DataParallel:
    """Mixin for our ``HFLM`` subclasses: the rank and world size of ``accelerate launch`` where HFLM did not take
    them (no GPU, or one GPU).

    HFLM keeps its ``Accelerator`` whenever several processes run, but shards the requests only with
    more than one GPU; after ``join_data_parallel()``, ``accelerate launch --cpu --num_processes N -m lm_eval``
    splits them too. lm-eval reads both through the public ``rank``/``world_size`` properties, overridden here.
    """

    _joined: tuple[int, int] | None = None  # (rank, world size) taken from accelerate; None: HFLM's own

    def join_data_parallel(self) -> None:
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1 and self.world_size == 1:
            self._joined = (accelerator.process_index, accelerator.num_processes)

    @property
    def rank(self) -> int:
        return super().rank if self._joined is None else self._joined[0]

    @property
    def world_size(self) -> int:
        return super().world_size if self._joined is None else self._joined[1]


def sample_key(task: str | None, context: str) -> tuple[str, str]:
    """What identifies a sample in lm-eval's sample log: its task and ``prompt_hash`` (of the first
    request's context; all requests of a multiple-choice sample share it)."""
    return str(task), hash_string(context)


def add_accounting(task: str, samples: list[dict], accounting: Accounting | None = None) -> list[dict]:
    """Put each logged sample's accounting record (if any) in its field ``diffmas_accounting``.

    ``accounting``: the model's (``lm.accounting``) when the caller has the model object; by default the
    latest model's, the only way lm-eval's CLI allows (module docstring)."""
    by_sample = accounting.by_sample if accounting is not None else LATEST["by_sample"]
    for sample in samples:
        record = by_sample.get((str(task), sample.get("prompt_hash")))
        if record is not None:
            sample[ACCOUNTING_KEY] = record
    return samples
