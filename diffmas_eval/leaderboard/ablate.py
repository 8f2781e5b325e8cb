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

import contextlib
import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from .. import DEFAULT_MODEL
from ..latent.chain import TraceTooLongError, check_budget, upstream_prompt_ids
from ..latent.config import LatentConfig
from ..latent.persist import load_trained_chain
from ..models import load_model, prepare_tokenizer, resolve_pretrained
from ..prompts import TEXT_ROLES, final_prompt_ids, question_prompt
from ..training.trainer import question_of, training_row
from .grid.ablations import AXES, Variant, grid, probe_path
from .grid.cells import done
from .grid.plan import fit_check, plans_of
from .grid.settings import CODE_TASKS, Settings, short_hash
from .grid.trainings import chat_set, check_disjoint, sft_set
from .results.ablations import publish
from .runner.jobs import (
    cell_job,
    gpus_left_to_ray,
    preflight,
    print_plan,
    refuse_server_beside_cluster,
    rerun_on_restarted,
    run_environment,
    train_job,
    worker_device,
)
from .runner.placement import Placement, resources_of
from .runner.scheduler import Job, run_jobs
from .runner.serve import (
    SERVER_RESOURCE,
    SERVER_SLOTS,
    ServedRun,
    ServeOptions,
    describe,
    planned_share,
    register,
    server_resources,
)


# -- bad input, before anything runs ---------------------------------------------------------------
def _longest_item(task: str, limit: int, tokenizer) -> tuple[str, int | None]:
    """The longest question among the task's scored items (lm-eval's own docs), and the longest choice's tokens
    (None: a generative task, whose answer takes its token cap)."""
    from lm_eval.tasks import TaskManager, get_task_dict  # start-up time: lm_eval builds its task index at import

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

    data, runs, work = data.resolve(), runs.resolve(), work.resolve()
    grid_cells, probes, logs = cells_of(opts, base), runs / "probes", work / "logs"
    # the probe reads the rows as the adapters are trained on them: chat rows when the cells are scored with the
    # chat template (the final agent's prompt then ends in the generation prompt the adapter learned to answer)
    rows = chat_set(data) if base.sft_format(family) == "chat" else data
    first, trained, names = [], [], {}  # names: a job's key (what it computes, by hash) -> its job's name

    def add(into: list, key: str, label: str, fn, args: tuple, what: tuple, after: str | None = None,
            then=None, resources: dict | None = None) -> str:
        """One job per key: the reference chain is every axis's anchor, but it is trained and scored once."""
        if key not in names:
            kind, digest = key.split(" ", 1)
            names[key] = f"{kind} {label} [{digest.removeprefix('probe-')}]"
            into.append(Job(names[key], fn, args, logs / f"{key.replace(' ', '-')}.log", after and names[after],
                            kind="train" if what[0] == "train" else "cell", what=what, then=then,
                            resources=resources or {}))
        return key

    for v, seed, s in grid_cells:
        s.sft_sources = dict(base.sft_sources)
        label = f"{v.name} seed {seed}"
        todo = []
        if not done(runs, s, v.method, opts.task):
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
            served = endpoint is not None and s.served(v.method, opts.task)  # registered by the driver, once
            adapter = add(trained, f"train {short_hash(s.training(v.method, family))}", label, train_job,
                          (s, v.method, family, data, work, device, opts.threads), ("train", s),
                          then=partial(register, endpoint.url) if served else None)
        for key, fn, args, what in todo:
            server = endpoint is not None and what[0] == "cell" and s.served(v.method, opts.task)
            add(trained if adapter else first, key, label, fn, args, what, adapter,
                resources=server_resources(v.method) if server else None)
    return Plan(grid_cells, family, rows, runs, probes, first + trained)


def base_settings(opts: AblationOptions) -> Settings:
    """The leaderboard ``Settings`` every variant starts from (``Variant.settings`` changes only its own axis)."""
    return Settings(model=opts.model, limit=opts.limit, train_steps=opts.train_steps,
                    train_batch_size=opts.train_batch_size, train_budgets={}, train_max_length=opts.train_max_length)


def run_ablation(opts: AblationOptions) -> list[dict]:
    """Train, score and probe what is missing; write the CSVs, charts and Markdown; return the cells' rows."""

    if opts.task in CODE_TASKS:
        raise ValueError(f"{opts.task}: ablations score lm-eval tasks (their per-item scores pair the cells); "
                         "choose e.g. diffmas_arc_challenge, diffmas_commonsense_qa or diffmas_gsm8k")
    if not opts.seeds:
        raise ValueError("--seeds is empty")
    if opts.limit < 1:
        raise ValueError(f"--limit must be >= 1 (the same first items for every cell), got {opts.limit}")
    base = base_settings(opts)
    family = base.family_of(opts.task)
    if family is None:
        raise ValueError(f"no SFT family for task {opts.task}; ablations train on the task's family: choose a task "
                         "the leaderboard maps (e.g. diffmas_arc_challenge, diffmas_gsm8k)")
    output = Path(opts.output)
    runs, work = output.parent / "runs", Path(opts.work_dir) if opts.work_dir else output.parent / "cache"
    res = resources_of(opts, output, work)  # the placement flags' own checks
    if opts.serve:
        refuse_server_beside_cluster(opts)
    check_fits(cells_of(opts, base), opts)  # before any compute
    device, batch = run_environment(opts.device, opts.batch_size, opts.data_dir, opts.threads)
    data, bounds, base.sft_sources[family] = sft_set(family, None, work, opts.data_dir)
    check_disjoint(family, bounds, [opts.task], opts.limit)
    t0 = time.perf_counter()
    server = None
    if opts.serve:  # before any hash is read: the served cells' hashes hold the server's version and arguments
        serve = ServeOptions(backend=opts.serve, vllm_python=opts.vllm_python, vllm_args=opts.vllm_args,
                             ready_timeout=opts.vllm_ready_timeout, concurrency=opts.vllm_concurrency)
        base.serving, python = describe(base, serve, device)
        served = [(v.method, opts.task) for v, _, s in cells_of(opts, base)
                  if s.served(v.method, opts.task) and not done(runs, s, v.method, opts.task)]
        if not opts.plan and served:
            server = ServedRun(base, serve, python, device, work / "logs")
    with server if server is not None else contextlib.nullcontext():
        if server is not None:
            preflight(server, base, served, device)  # before any job: the server can serve these cells
        p = plan(opts, base, family, data, runs, work, opts.device, batch, server.endpoint() if server else None)

        def estimates(per_cell: float, per_training: int) -> list:
            return plans_of(p.jobs, p.runs, batch, per_cell, per_training, opts.threads or 1)

        if opts.plan:
            print_plan(estimates, res, planned_share(base, serve, device) if opts.serve else 0.0)
            return []
        print(f"== ablate: {len(p.cells)} cells on {opts.task} (first {opts.limit} items); {len(p.jobs)} jobs to "
              f"run, {opts.jobs or 'as many as the resources allow'} at a time", flush=True)
        if p.jobs:
            # the server's share of the jobs' GPUs, read before a local Ray is given the GPUs it leaves
            res.fits = fit_check(estimates, server.gpu_share() if server is not None else 0.0)
            res.retry = rerun_on_restarted(server) if server is not None else None
            res.custom = {SERVER_RESOURCE: SERVER_SLOTS} if server is not None else {}
            with gpus_left_to_ray(server, opts):
                run_jobs(p.jobs, res)
    print(f"== ablate: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return publish(p, opts, output)






@dataclass
class AblationOptions(Placement):
    """What ``diffmas-eval ablate`` runs; every field is a flag of the same name (``--ref-agents``, ...); where its
    jobs run: ``Placement``'s fields, the leaderboard's flags."""

    model: str = DEFAULT_MODEL
    task: str = "diffmas_commonsense_qa"
    limit: int = 150
    axes: list[str] = field(default_factory=lambda: list(AXES))
    latent_steps: list[int] = field(default_factory=lambda: [0, 10, 40])
    agents: list[int] = field(default_factory=lambda: [2, 3, 4])
    ref_agents: int = 3
    ref_steps: int = 10
    seeds: list[int] = field(default_factory=lambda: [1234])
    train_steps: int = 25
    train_batch_size: int = 4
    train_max_length: int = 256
    probe_rows: int = 2
    max_trace_tokens: int | None = None
    output: str = "leaderboards/ablations/ablations.csv"
    work_dir: str | None = None
    data_dir: str | None = None
    batch_size: str = "8"
    device: str | None = None
    # --serve vllm (leaderboard/serve.py): the latent cells' final agent decodes on a vLLM server
    serve: str | None = None
    vllm_python: str | None = None
    vllm_args: str = ""
    vllm_ready_timeout: float = 1800.0
    vllm_concurrency: int = 8


def cells_of(opts: AblationOptions, base: Settings) -> list[tuple[Variant, int, Settings]]:
    """Every (variant, seed) cell: trained variants once per seed, untrained ones once (module docstring)."""
    out = [(v, seed, v.settings(base, seed))
           for v in grid(opts.axes, opts.latent_steps, opts.agents, opts.ref_agents, opts.ref_steps)
           for seed in (opts.seeds if v.trained else opts.seeds[:1])]
    for _, _, s in out:
        s.check_chain()
    return out
