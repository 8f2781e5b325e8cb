"""``diffmas-eval ablate`` (``make ablations``): the paper's ablations, run as leaderboard cells.

Each variant of the chain is a leaderboard ``Settings`` (agents, latent steps, seed, and ``chain``: the trace
layout, ``stage1_grad``, a trained realignment) scored as the ``latentmas`` (untrained) or ``diffmas`` (trained)
method on the same items of one task. So it is trained by the leaderboard's ``accelerate launch``, scored by its
lm-eval call, keyed by its hashes (a rerun reuses every finished cell, adapter and probe), and run as its Ray
jobs, with its placement flags (``--jobs``, ``--gpus-per-cell``, ``--ray-address``, ``--plan``, ...): one
mechanism, not a second pipeline.

The axes, each varied alone around the reference chain (``--ref-agents`` agents, ``--ref-steps`` latent steps,
concatenated trace, stage 1 trained through, fixed ridge realignment):

- ``latent_steps``: every value of ``--latent-steps``, untrained and trained;
- ``agents``: every value of ``--agents``, trained;
- ``trace``: concat | overwrite | stitch, trained; ``stage1_grad``: full | none, trained; ``realign``: fixed |
  trained (W_a trained with the LoRA), trained.

A trained variant is trained and scored once per seed (the seed sets the LoRA's initialisation and the data
order). An untrained one under greedy decoding does not depend on the seed, so it is scored once: its spread
over seeds is 0 by construction, and the table says so rather than repeating one number three times.

Besides accuracy, every variant's per-agent gradient norm ``||d loss / d segment_k||`` (``AgentChain.
gradient_probe``, with stage 1 differentiable whatever the variant trained with) is measured on the first
``--probe-rows`` SFT rows at step 0 (the base model) and after training (the adapter): the concatenation
argument is about the trained chain as much as the initial one.

Before anything runs, every cell's longest item is laid out as the chain would lay it out, and a grid whose
trace exceeds ``--max-trace-tokens`` or the model's context is refused, naming the cell and the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .ablate_grid import AXES, AblationOptions, Variant, cells_of, probe_path
from .config import CODE_TASKS, Settings, short_hash
from .placement import add_placement_flags


# -- bad input, before anything runs ---------------------------------------------------------------
def _longest_item(task: str, limit: int, tokenizer) -> tuple[str, int | None]:
    """The longest question among the task's scored items (lm-eval's own docs), and the longest choice's tokens
    (None: a generative task, whose answer takes its token cap)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    t = get_task_dict([task], TaskManager())[task]
    docs = list(t.eval_docs)[:limit or None]
    if not docs:
        raise ValueError(f"{task} has no items to score")
    texts = [str(t.doc_to_text(doc)) for doc in docs]
    longest = max(texts, key=lambda x: len(tokenizer(x)["input_ids"]))
    if t.OUTPUT_TYPE != "multiple_choice":
        return longest, None
    return longest, max(len(tokenizer(" " + str(c))["input_ids"]) for doc in docs for c in t.doc_to_choice(doc))


def check_fits(cells: list[tuple[Variant, int, Settings]], opts: AblationOptions) -> None:
    """Refuse a grid with a cell whose trace (or whole chain) would not fit: the chain's own budget check on the
    task's longest item, laid out by each cell's chain from the tokenizer alone (no model is loaded)."""
    from transformers import AutoConfig, AutoTokenizer

    from ..latent.chain import TraceTooLongError, check_budget, upstream_prompt_ids
    from ..latent.config import LatentConfig
    from ..models import prepare_tokenizer, resolve_pretrained
    from ..prompts import TEXT_ROLES, final_prompt_ids, question_prompt

    path = resolve_pretrained(opts.model)
    tok = AutoTokenizer.from_pretrained(path)
    prepare_tokenizer(tok)
    ctx = getattr(AutoConfig.from_pretrained(path).get_text_config(), "max_position_embeddings", None)
    question, choice_tokens = _longest_item(opts.task, opts.limit, tok)
    for v, _, s in cells:
        config = LatentConfig.from_dict({"agents": v.agents, "latent_steps": v.latent_steps,
                                         "max_trace_tokens": opts.max_trace_tokens,
                                         **{k: x for k, x in v.chain if k == "trace"}})
        lengths = [[len(p[0])] for p in upstream_prompt_ids(tok, TEXT_ROLES, config, [question])]
        prompt = question_prompt(tok, question) if s.chat_template else question
        final = len(final_prompt_ids(tok, config.upstream, prompt))  # the final agent's prompt, as trained
        final += s.answer_cap(opts.task) if choice_tokens is None else choice_tokens
        try:
            check_budget(config, lengths, [final], ctx)
        except TraceTooLongError as err:
            raise ValueError(f"ablation cell {v.name} (agents={v.agents}, latent_steps={v.latent_steps}) does not fit "
                             f"on the longest of {opts.task}'s first {opts.limit} items: "
                             f"{str(err).removeprefix('row 0: ')}") from None


# -- gradient probes ------------------------------------------------------------------------------------
def probe(settings: Settings, family: str, rows: Path, n_rows: int, out_dir: Path, device: str | None,
          adapter: Path | None = None) -> Path:
    """Per-agent ``||d loss / d segment||`` of the chain of ``settings`` (with ``adapter``: the trained chain,
    ``latent.persist.load_trained_chain``), averaged over the first ``n_rows`` SFT rows, each laid out exactly as
    the trainer trains it (``training.trainer.training_row``); on ``device``, else the one of the node it runs on."""
    from ..latent.persist import load_trained_chain
    from ..models import load_model
    from ..training.trainer import question_of, training_row
    from .run import worker_device

    device = worker_device(device)

    out = probe_path(settings, family, rows, n_rows, out_dir, adapter is not None)
    if out.exists():
        return out
    # the chain as trained (the adapter's saved options and realignment), stage 1 differentiable for the probe
    trained = load_trained_chain(adapter, agents=settings.agents, latent_steps=settings.latent_steps,
                                 trace=settings.chain.get("trace", "concat"), stage1_grad="full")
    model, tok = load_model(settings.model, dtype="float32", device=device, peft=trained.adapter)
    chain = trained.build(model, tok)
    config = chain.config
    data = [json.loads(line) for line in rows.read_text().splitlines() if line.strip()][:n_rows]
    norms = [0.0] * len(config.upstream)
    for row in data:
        question = question_of(row["prompt"])
        ids, labels = training_row(tok, config.upstream, row["prompt"], row["completion"])  # as the trainer trains
        for k, (_, g) in enumerate(chain.gradient_probe([question], [ids], [labels])):
            norms[k] += g / len(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"roles": config.upstream, "norms": norms, "agents": settings.agents,
                               "latent_steps": settings.latent_steps, "trace": config.trace,
                               "adapter": str(adapter) if adapter else "", "rows": rows.name}, indent=1) + "\n")
    tmp.replace(out)
    return out


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class Plan:
    """The grid's cells, and the jobs still to run for them (an adapter only when a missing cell or probe needs it)."""

    cells: list
    family: str
    data: Path  # the SFT rows the probes read, in the adapters' training format
    runs: Path
    probes: Path
    jobs: list


def plan(opts: AblationOptions, base: Settings, family: str, data: Path, runs: Path, work: Path,
         device: str | None, batch: int | str, endpoint=None) -> Plan:
    """The jobs, each on ``device`` if given, else on the device of the node it lands on; every path absolute, as
    a job may run on another node (the store is shared) or in another directory. ``endpoint``: the run's vLLM
    server (``--serve vllm``), which the served cells decode on."""
    from . import cells
    from .run import cell_job, train_job
    from .scheduler import Job
    from .train import chat_set

    data, runs, work = data.resolve(), runs.resolve(), work.resolve()
    grid_cells, probes, logs = cells_of(opts, base), runs / "probes", work / "logs"
    # the probe reads the rows as the adapters are trained on them: chat rows when the cells are scored with the
    # chat template (the final agent's prompt then ends in the generation prompt the adapter learned to answer)
    rows = chat_set(data) if base.sft_format(family) == "chat" else data
    first, trained, names = [], [], {}  # names: a job's key (what it computes, by hash) -> its job's name

    def add(into: list, key: str, label: str, fn, args: tuple, what: tuple, after: str | None = None) -> str:
        """One job per key: the reference chain is every axis's anchor, but it is trained and scored once."""
        if key not in names:
            kind, digest = key.split(" ", 1)
            names[key] = f"{kind} {label} [{digest.removeprefix('probe-')}]"
            into.append(Job(names[key], fn, args, logs / f"{key.replace(' ', '-')}.log", after and names[after],
                            kind="train" if what[0] == "train" else "cell", what=what))
        return key

    for v, seed, s in grid_cells:
        s.sft_sources = dict(base.sft_sources)
        label = f"{v.name} seed {seed}"
        todo = []
        if not cells.done(runs, s, v.method, opts.task):
            todo.append((f"score {short_hash(s.cell(v.method, opts.task))}", cell_job,
                         (s, v.method, opts.task, runs, work, batch, device, endpoint),
                         ("cell", s, v.method, opts.task)))
        if v.trained:
            step0 = probe_path(s, family, rows, opts.probe_rows, probes, False)
            if not step0.exists():  # the base model: the same for every seed
                add(first, f"probe {step0.stem}", f"step 0 {v.name}", probe,
                    (s, family, rows, opts.probe_rows, probes, device), ("probe", s))
            after = probe_path(s, family, rows, opts.probe_rows, probes, True)
            if not after.exists():
                todo.append((f"probe {after.stem}", probe, (s, family, rows, opts.probe_rows, probes, device),
                             ("probe", s)))
        adapter = None
        if todo and v.trained:
            adapter = add(trained, f"train {short_hash(s.training(v.method, family))}", label, train_job,
                          (s, v.method, family, data, work, device, opts.threads), ("train", s))
        for key, fn, args, what in todo:
            add(trained if adapter else first, key, label, fn, args, what, adapter)
    return Plan(grid_cells, family, rows, runs, probes, first + trained)


def run_ablation(opts: AblationOptions) -> list[dict]:
    """Train, score and probe what is missing; write the CSVs, charts and Markdown; return the cells' rows."""
    from . import cells, train
    from .ablate_report import publish
    from .placement import resources_of
    from .plan import fit_check, plans_of, show
    from .run import run_environment
    from .scheduler import run_jobs

    if opts.task in CODE_TASKS:
        raise ValueError(f"{opts.task}: ablations score lm-eval tasks (their per-item scores pair the cells); "
                         "choose e.g. diffmas_arc_challenge, diffmas_commonsense_qa or diffmas_gsm8k")
    if not opts.seeds:
        raise ValueError("--seeds is empty")
    if opts.limit < 1:
        raise ValueError(f"--limit must be >= 1 (the same first items for every cell), got {opts.limit}")
    base = Settings(model=opts.model, limit=opts.limit, train_steps=opts.train_steps,
                    train_batch_size=opts.train_batch_size, train_budgets={}, train_max_length=opts.train_max_length)
    family = base.family_of(opts.task)
    if family is None:
        raise ValueError(f"no SFT family for task {opts.task}; ablations train on the task's family: choose a task "
                         "the leaderboard maps (e.g. diffmas_arc_challenge, diffmas_gsm8k)")
    output = Path(opts.output)
    runs, work = output.parent / "runs", Path(opts.work_dir) if opts.work_dir else output.parent / "cache"
    res = resources_of(opts, output, work)  # the placement flags' own checks
    check_fits(cells_of(opts, base), opts)  # before any compute
    device, batch = run_environment(opts.device, opts.batch_size, opts.data_dir, opts.threads)
    data, bounds, base.sft_sources[family] = train.sft_set(family, None, work, opts.data_dir)
    train.check_disjoint(family, bounds, [opts.task], opts.limit)
    t0 = time.perf_counter()
    server = None
    if opts.serve:  # before any hash is read: the served cells' hashes hold the server's version and arguments
        from .serve import ServedRun, ServeOptions, describe

        serve = ServeOptions(backend=opts.serve, vllm_python=opts.vllm_python, vllm_args=opts.vllm_args,
                             ready_timeout=opts.vllm_ready_timeout, concurrency=opts.vllm_concurrency)
        base.serving, python = describe(base, serve, device)
        if not opts.plan and any(s.served(v.method, opts.task) and not cells.done(runs, s, v.method, opts.task)
                                 for v, _, s in cells_of(opts, base)):
            server = ServedRun(base, serve, python, device, work / "logs")
    with server if server is not None else contextlib.nullcontext():
        p = plan(opts, base, family, data, runs, work, opts.device, batch, server.endpoint() if server else None)

        def estimates(per_cell: float, per_training: int) -> list:
            return plans_of(p.jobs, p.runs, batch, per_cell, per_training, opts.threads or 1)

        if opts.plan:
            show(estimates, res)
            return []
        print(f"== ablate: {len(p.cells)} cells on {opts.task} (first {opts.limit} items); {len(p.jobs)} jobs to "
              f"run, {opts.jobs or 'as many as the resources allow'} at a time", flush=True)
        if p.jobs:
            res.fits = fit_check(estimates)
            run_jobs(p.jobs, res)
    print(f"== ablate: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return publish(p, opts, output)


# -- CLI -------------------------------------------------------------------------------------------
def add_ablate_parser(sub) -> None:
    from .cli import add_serve_flags

    d = AblationOptions()
    p = sub.add_parser("ablate", help="the paper's ablations (latent steps, agents, trace, stage-1 gradient, "
                                      "realignment) as leaderboard cells; CSV, charts, docs/ablations.md section",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model, help="hub id, local path or bundled:NAME (default: %(default)s)")
    p.add_argument("--task", default=d.task, help="one lm-eval task with an SFT family (default: %(default)s)")
    p.add_argument("--limit", type=int, default=d.limit, help="first N items, the same for every cell (%(default)s)")
    p.add_argument("--axes", default=",".join(d.axes), help=f"comma-separated, from {', '.join(AXES)} (default: all)")
    p.add_argument("--latent-steps", default=d.latent_steps, metavar="M,...",
                   help="the latent_steps axis (default: 0,10,40; the paper's: 0,10,40,100,200)")
    p.add_argument("--agents", default=d.agents, metavar="N,...",
                   help="the agents axis (default: 2,3,4; the paper's range: 2,3,4,5,6)")
    p.add_argument("--ref-agents", type=int, default=d.ref_agents, help="the reference chain's agents (%(default)s)")
    p.add_argument("--ref-steps", type=int, default=d.ref_steps,
                   help="the reference chain's latent steps (%(default)s)")
    p.add_argument("--seeds", default=d.seeds, metavar="S,...",
                   help="training seeds (default: 1234; the paper's protocol: three)")
    p.add_argument("--train-steps", type=int, default=d.train_steps, help="optimizer steps per adapter (%(default)s)")
    p.add_argument("--train-batch-size", type=int, default=d.train_batch_size,
                   help="rows per optimizer step (%(default)s)")
    p.add_argument("--train-max-length", type=int, default=d.train_max_length,
                   help="tokens per training row (%(default)s)")
    p.add_argument("--probe-rows", type=int, default=d.probe_rows,
                   help="SFT rows the gradient probe averages over (%(default)s)")
    p.add_argument("--max-trace-tokens", type=int, default=None,
                   help="refuse a grid whose trace would exceed this many positions (default: the model's context)")
    p.add_argument("--output", default=d.output, help="the cells' CSV; the rest goes beside it (%(default)s)")
    p.add_argument("--work-dir", default=None, help="SFT set, adapters, request caches (default: OUTPUT_DIR/cache)")
    p.add_argument("--data-dir", default=os.environ.get("DIFFMAS_DATA_DIR"),
                   help="local benchmark data; default $DIFFMAS_DATA_DIR, else the hub")
    add_placement_flags(p)  # the leaderboard's: --threads, --jobs, --ray-address, --gpus-per-*, --plan, ...
    p.add_argument("--batch-size", default=d.batch_size, help="scoring batch size (%(default)s)")
    p.add_argument("--device", default=None)
    add_serve_flags(p)
    p.add_argument("--readme", default=None, metavar="PAGE.md",
                   help="only regenerate the ablations section (docs/ablations.md) from the CSVs beside --output")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from ..options import parse_counts
    from .ablate_report import update_readme
    from .config import parse_list

    if args.readme:
        changed = update_readme(Path(args.readme), Path(args.output))
        print(f"{args.readme}: ablations section {'updated' if changed else 'already up to date'}")
        return 0
    names = {f.name for f in dataclasses.fields(AblationOptions)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["axes"] = parse_list(args.axes, AXES, "axes")
    for key in ("latent_steps", "agents", "seeds"):  # flags given as text; defaults are lists already
        if isinstance(values[key], str):
            values[key] = parse_counts(values[key], "--" + key.replace("_", "-"))
    run_ablation(AblationOptions(**values))
    return 0
