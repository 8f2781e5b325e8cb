"""Multiple-choice scoring: ``diffmas`` against lm-eval's ``hf`` on the same requests, and against its floor.

What is measured, all in one process (absolute times on a shared machine are noise; the ratios are
the result):

- **seconds per question** of ``lm.loglikelihood`` on the loglikelihood requests of
  ``diffmas_arc_challenge`` (the first ``--limit`` docs, each with its four or five choices), for
  lm-eval's ``hf``, ``diffmas`` with ``agents=1`` (no trace: the same forwards as ``hf``) and
  ``diffmas`` with ``--agents`` agents and ``--latent-steps`` latent steps; without and with the chat
  template, at each ``--batch`` size. Requests are built by lm-eval itself (``TaskManager``,
  ``task.build_all_requests`` with each model's own chat template), so each model scores exactly
  what ``lm_eval --tasks diffmas_arc_challenge`` would hand it.
- **the floor**: every model forward a run makes is recorded (a forward pre-hook: batch, new
  tokens, cache length, logits kept) and then replayed as a *plain* forward of the same shape over a
  ``DynamicCache`` of the same length, with no attention mask and no bookkeeping. For ``diffmas``
  those forwards are the unavoidable sequential ones: stage 1 (one prefill per upstream agent and
  its latent steps), ONE prefill of the question's context over the trace, and one forward of the
  choices' continuation tokens. ``x floor`` is the measured time over the replayed time; the issue's
  target for ``diffmas`` is at most 1.2x. A second table splits ``diffmas`` time by phase (stage 1,
  context prefill, continuations, and what lm-eval and the adapter spend outside the chain).
- a sanity column: the largest |log-likelihood difference| between ``diffmas agents=1`` and ``hf``
  (they run the same model on the same tokens, so it is rounding).

    DIFFMAS_DATA_DIR=/work/shared/data python benchmarks/multiple_choice.py --json mc.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

from diffmas_eval import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]
TASK = "diffmas_arc_challenge"


@dataclass(frozen=True)
class Call:
    """One model forward, as far as its cost goes."""

    phase: str
    batch: int
    width: int
    past: int
    embeds: bool
    keep: int  # logits_to_keep (0: every column)
    hidden: bool  # output_hidden_states


@dataclass
class Recorder:
    """Forward pre-hook on the model: records each call's shape under the phase set by the chain wrappers."""

    phase: str = "model"
    calls: list[Call] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    on: bool = False

    def hook(self, module, args, kwargs):
        if not self.on:
            return
        x = kwargs.get("input_ids", args[0] if args else None)
        embeds = x is None
        if embeds:
            x = kwargs["inputs_embeds"]
        batch, width = x.shape[:2]
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if mask is not None and mask.dim() == 2:
            past = mask.shape[-1] - width
        else:
            past = cache.get_seq_length() if cache is not None else 0
        keep = kwargs.get("logits_to_keep", 0)
        self.calls.append(Call(self.phase, batch, width, past, embeds, int(keep) if isinstance(keep, int) else 0,
                               bool(kwargs.get("output_hidden_states"))))

    device: torch.device = torch.device("cpu")

    def wrap(self, obj, name: str, phase: str) -> None:
        """Time ``obj.name`` and tag the forwards it makes with ``phase`` (an instance attribute, no core edit)."""
        original = getattr(obj, name)

        def timed(*args, **kwargs):
            outer, self.phase = self.phase, phase
            sync(self.device)
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                sync(self.device)
                if self.on:
                    self.seconds[phase] += time.perf_counter() - t0
                self.phase = outer

        object.__setattr__(obj, name, timed)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer reads the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def replay(model, calls: list[Call]) -> dict[str, float]:
    """Seconds per phase of plain forwards with the recorded shapes (caches built outside the timer)."""
    cfg = model.config.get_text_config()
    kv_heads = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    weight = model.get_input_embeddings().weight
    out: dict[str, float] = defaultdict(float)
    with torch.no_grad():
        for c in calls:
            cache = DynamicCache()
            if c.past:
                kv = torch.zeros(c.batch, kv_heads, c.past, head_dim, dtype=weight.dtype, device=weight.device)
                for layer in range(cfg.num_hidden_layers):
                    cache.update(kv, kv, layer)
            x = (torch.randn(c.batch, c.width, cfg.hidden_size, dtype=weight.dtype, device=weight.device) * 0.02
                 if c.embeds else torch.zeros(c.batch, c.width, dtype=torch.long, device=weight.device))
            inputs = {"inputs_embeds" if c.embeds else "input_ids": x}
            sync(weight.device)
            t0 = time.perf_counter()
            model(**inputs, cache=cache, use_cache=True, logits_to_keep=c.keep, output_hidden_states=c.hidden)
            sync(weight.device)
            out[c.phase] += time.perf_counter() - t0
    return out


def build_requests(manager, lm, chat: bool, limit: int) -> list:
    """The task's loglikelihood Instances for ``lm``, as lm-eval's evaluator builds them (its chat template)."""
    from lm_eval.tasks import get_task_dict

    task = get_task_dict([TASK], manager)[TASK]
    task.build_all_requests(limit=limit, rank=0, world_size=1, apply_chat_template=chat,
                            chat_template=lm.apply_chat_template if chat else None,
                            tokenizer_name=getattr(lm, "tokenizer_name", "") if chat else "")
    return list(task.instances)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local path or bundled:NAME")
    p.add_argument("--limit", type=int, default=8, help="first N docs of the task")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--chat", choices=["off", "on"], nargs="+", default=["off", "on"], help="chat template")
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--latent-steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1, help="median over this many timed runs (after a warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", metavar="OUT", help="write every number here")
    args = p.parse_args()
    os.environ.setdefault("DIFFMAS_DATA_DIR", str((REPO.parent / "shared" / "data").resolve()))
    torch.set_num_threads(args.threads)

    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from diffmas_eval.harness.plugin import install
    from diffmas_eval.models import resolve_pretrained

    install()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-build notes about custom_dataset kwargs
    path = resolve_pretrained(args.model)
    common = f"pretrained={path},dtype={args.dtype},device={args.device},batch_size=1"
    big = f"diffmas agents={args.agents} m={args.latent_steps}"
    specs = {"hf": ("hf", common), "diffmas agents=1": ("diffmas", f"{common},agents=1"),
             big: ("diffmas", f"{common},agents={args.agents},latent_steps={args.latent_steps}")}
    lms, recorders = {}, {}
    for name, (kind, model_args) in specs.items():
        lm = lms[name] = get_model(kind).create_from_arg_string(model_args)
        rec = recorders[name] = Recorder(device=lm.model.device)
        lm.model.register_forward_pre_hook(rec.hook, with_kwargs=True)
        if kind == "diffmas":
            for method, phase in (("stage1", "stage 1"), ("prefill", "context prefill"),
                                  ("continuation_scores", "continuations")):
                rec.wrap(lm.chain, method, phase)

    manager = TaskManager()
    rows = []
    settings = [(chat == "on", bs) for chat in args.chat for bs in args.batch]
    bar = tqdm(total=len(settings) * len(lms) * args.repeats, desc="multiple choice", unit="run")
    for chat, bs in settings:
        requests = {name: build_requests(manager, lm, chat, args.limit) for name, lm in lms.items()}
        questions = len({r.doc_id for r in requests["hf"]})
        results, measured, floor, phases, calls = {}, defaultdict(list), defaultdict(list), defaultdict(list), {}
        for name, lm in lms.items():  # warm-up: one question, untimed
            lm.batch_size_per_gpu = bs
            lm.loglikelihood([r for r in requests[name] if r.doc_id == requests[name][0].doc_id], disable_tqdm=True)
        for _ in range(args.repeats):
            for name, lm in lms.items():  # interleaved, so drift on the machine hits every method alike
                lm.batch_size_per_gpu = bs  # HFLM and DiffMASLM both batch by this attribute
                rec = recorders[name]
                rec.calls, rec.seconds, rec.on = [], defaultdict(float), True
                sync(rec.device)
                t0 = time.perf_counter()
                results[name] = lm.loglikelihood(requests[name], disable_tqdm=True)
                sync(rec.device)
                measured[name].append(time.perf_counter() - t0)
                rec.on = False
                phases[name].append(dict(rec.seconds))
                calls[name] = rec.calls
                floor[name].append(replay(lm.model, rec.calls))
                bar.update()
        hf_s = statistics.median(measured["hf"]) / questions
        for name in lms:
            total = statistics.median(measured[name])
            fl = {k: statistics.median(f.get(k, 0.0) for f in floor[name]) for k in floor[name][0]}
            ph = {k: statistics.median(x.get(k, 0.0) for x in phases[name]) for k in phases[name][0]}
            row = {"method": name, "chat": chat, "batch": bs, "questions": questions,
                   "requests": len(requests[name]), "forwards": len(calls[name]),
                   "s_per_question": total / questions, "ratio_to_hf": total / questions / hf_s,
                   "floor_s_per_question": sum(fl.values()) / questions, "x_floor": total / sum(fl.values()),
                   "phases_s": ph, "phase_floor_s": fl}
            if name == "diffmas agents=1":
                row["max_abs_ll_diff_vs_hf"] = max(abs(a[0] - b[0]) for a, b in zip(results[name], results["hf"]))
            rows.append(row)
    bar.close()
    print_tables(rows, args, path)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "model_path": path, "rows": rows}, indent=2))
        print(f"\nwrote {args.json}")


def print_tables(rows: list[dict], args, path: str) -> None:
    threads = f", {args.threads} threads" if args.device == "cpu" else f", {torch.cuda.get_device_name()}"
    print(f"\n{TASK}, first {args.limit} docs; model {args.model} ({args.dtype}, {args.device}{threads}); "
          f"median of {args.repeats} run(s) after a warm-up; ratios from this run only\n")
    print("| method | chat | batch | forwards / question | s / question | x hf | floor s / question | x floor |"
          " max abs dLL vs hf |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        diff = f"{r['max_abs_ll_diff_vs_hf']:.1e}" if "max_abs_ll_diff_vs_hf" in r else ""
        print(f"| {r['method']} | {'on' if r['chat'] else 'off'} | {r['batch']} | {r['forwards'] / r['questions']:.1f} "
              f"| {r['s_per_question']:.3f} | {r['ratio_to_hf']:.2f} | {r['floor_s_per_question']:.3f} "
              f"| {r['x_floor']:.2f} | {diff} |")
    print("\nWhere diffmas spends it (s / question, measured and its floor; 'outside' is lm-eval and the adapter):\n")
    print("| method | chat | batch | stage 1 | x floor | context prefill | x floor | continuations | x floor "
          "| outside |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if not r["method"].startswith("diffmas"):
            continue
        q, ph, fl = r["questions"], r["phases_s"], r["phase_floor_s"]
        cells = []
        for phase in ("stage 1", "context prefill", "continuations"):
            m, f = ph.get(phase, 0.0), fl.get(phase, 0.0)
            cells += [f"{m / q:.3f}", f"{m / f:.2f}" if f else "-"]
        outside = r["s_per_question"] - sum(ph.values()) / q
        print(f"| {r['method']} | {'on' if r['chat'] else 'off'} | {r['batch']} | {' | '.join(cells)} "
              f"| {outside:.3f} |")


if __name__ == "__main__":
    main()
