"""The leaderboard as a function: ``run_leaderboard(settings, RunOptions(...), output)`` trains what is missing,
scores what is missing, collects every cell's results and publishes the CSV, table and charts.

``diffmas-eval leaderboard`` (``cli.py``) only parses its flags into a ``Settings`` (what the cells compute, and
so their hashes) and a ``RunOptions`` (how and where they run: nothing of it changes a number), then calls it.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .collect import STABILITY_METRICS
from .config import (
    CODE_TASKS,
    DEFAULT_METHODS,
    FAMILY,
    METHODS,
    TASKS,
    TEXT_METHODS,
    TRAINED,
    Settings,
    parse_list,
    short_hash,
)
from .placement import Placement, resources_of
from .serve import ServeOptions

if TYPE_CHECKING:
    from .serve import Endpoint, ServedRun


@dataclass
class RunOptions(Placement):
    """Which cells, and how they run. ``methods``, ``tasks``, ``stability``: comma-separated (``config.METHODS``,
    lm-eval task names and the code tasks); ``stability``: the tasks whose stability metrics are kept (None:
    every generative task); ``data_dir``: the local benchmark data (default ``$DIFFMAS_DATA_DIR``, else the hub);
    ``work_dir``: SFT sets, adapters, caches (default: beside the output); where the jobs run: ``Placement``'s
    fields (``placement.py``); ``serve``: the vLLM server that decodes the generative cells (``--serve vllm``,
    ``serve.py``; its backend, version and arguments enter the served cells' hashes through
    ``Settings.serving``). Nothing else here enters a cell's hash."""

    methods: str = ",".join(DEFAULT_METHODS)
    tasks: str = ",".join(TASKS)
    stability: str | None = None
    device: str | None = None
    batch_size: str | int = "8"
    data_dir: str | None = field(default_factory=lambda: os.environ.get("DIFFMAS_DATA_DIR"))
    work_dir: str | None = None
    serve: ServeOptions = field(default_factory=ServeOptions)


def run_leaderboard(settings: Settings, run: RunOptions, output: Path) -> list[dict]:
    """Every cell trained and scored (or reused), then published beside ``output`` (the CSV); returns the rows."""
    from .collect import collect, curves, items

    paths = run_cells(settings, run, output)
    if run.plan:
        return []
    specs = [str(p) for p in paths]
    rows = collect(specs)
    if run.stability:
        keep = set(parse_list(run.stability, None, "stability"))
        rows = [r for r in rows if r["metric"] not in STABILITY_METRICS or r["task"] in keep]
    publish(rows, output, curves(specs), items(specs))
    return rows


def publish(rows: list[dict], output: Path, curve_rows: list[dict] | None = None,
            item_rows: list[dict] | None = None) -> None:
    """The CSV, leaderboard.md and the charts, side by side (``curve_rows``: entropy_curve.csv's rows;
    ``item_rows``: leaderboard_items.csv's, the per-item scores that outlive the cells' results files); then the
    table, printed."""
    from . import adapters, compare
    from .report import charts, document, markdown, write_csv, write_curves, write_items

    paired = compare.comparisons(item_rows) if item_rows is not None else None  # refuses unpaired cells, first
    trained, losses = adapters.records([r["adapter"] for r in rows if r.get("adapter")])
    if trained:  # the adapters are here (not a --from-results collection): keep what a reader needs of them
        adapters.write(trained, losses, output.parent)
    write_csv(rows, output)
    if curve_rows is not None:
        write_curves(curve_rows, output.parent / "entropy_curve.csv")
    if item_rows is not None:
        write_items(item_rows, output.parent / "leaderboard_items.csv")
        compare.write(paired or [], output.parent / compare.FILE)
    trained, losses = adapters.read(output.parent)
    (output.parent / "leaderboard.md").write_text("# Leaderboard\n\n" + document(rows, "", paired, trained))
    for path in charts(rows, output.parent, paired, losses):
        print(f"wrote {path}")
    print(f"wrote {output}, {output.parent / 'leaderboard.md'}"
          + (f" and {output.parent / compare.FILE}" if paired is not None else ""))
    print(markdown(rows))


def run_environment(device: str | None, batch_size: str | int, data_dir: str | None,
                    threads: int | None) -> tuple[str, int | str]:
    """The device and batch size of a run, with its data directory and thread count set for this process and the
    jobs, trainings and EvalPlus runs it starts (``leaderboard`` and ``ablate`` alike)."""
    import torch

    if data_dir:
        os.environ["DIFFMAS_DATA_DIR"] = str(Path(data_dir).resolve())
    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # EvalPlus's and accelerate's subprocesses
    batch: int | str = int(batch_size) if str(batch_size).isdigit() else batch_size
    return device or ("cuda" if torch.cuda.is_available() else "cpu"), batch


def run_cells(settings: Settings, run: RunOptions, output: Path) -> list[Path]:
    """Train what is missing, score what is missing; return the results file of every cell."""
    from ..protocol import SAMPLED_TASKS, check_stability_tasks, is_generative
    from . import cells, train

    methods, tasks = parse_list(run.methods, METHODS, "methods"), parse_list(run.tasks, None, "tasks")
    resources_of(run, output, output.parent)  # the placement flags' own checks, before anything
    if settings.limit < 0:
        raise ValueError("--limit must be >= 0 (0 = every item)")
    protocol = settings.decoding()  # before any compute: k, temperature, top-p, the preset's name
    settings.recipe_settings()
    unknown_limits = sorted(set(settings.limits) - set(tasks))
    if unknown_limits:
        raise ValueError(f"--limit names task(s) {', '.join(unknown_limits)} not in --tasks ({', '.join(tasks)})")
    if run.stability:
        check_stability_tasks(parse_list(run.stability, None, "stability"))
    if protocol.samples > 1:
        unsampled = [t for t in tasks if t not in CODE_TASKS and t not in SAMPLED_TASKS and is_generative(t)]
        if unsampled:
            raise ValueError(f"{', '.join(unsampled)}: {protocol.samples} samples per question are scored for "
                             f"{', '.join([*SAMPLED_TASKS, *CODE_TASKS])} only (log-likelihood tasks are scored once)")
    device, batch_size = run_environment(run.device, run.batch_size, run.data_dir, run.threads)
    runs = output.parent / "runs"
    work = Path(run.work_dir) if run.work_dir else output.parent / "cache"
    vllm_python = None
    if run.serve.backend:  # before any hash is read: the served cells' hashes hold the server's version and arguments
        from .serve import describe

        settings.serving, vllm_python = describe(settings, run.serve, device)
    t_start = time.perf_counter()

    # 1. adapters: one per trained method and task family (the SFT set of that family)
    adapters: dict[tuple[str, str], Path] = {}
    trained = [m for m in methods if m in TRAINED]
    bad = {t: f for t, f in settings.families.items() if f not in set(FAMILY.values())}
    if bad:
        raise ValueError(f"--task-family {bad}: unknown family; choose from {sorted(set(FAMILY.values()))}")
    families = list(dict.fromkeys(settings.family_of(t) for t in tasks if settings.family_of(t)))
    unknown = [t for t in tasks if not settings.family_of(t)]
    if trained and unknown:
        raise ValueError(f"no SFT family for task(s) {', '.join(unknown)}, so {', '.join(trained)} cannot be scored "
                         "on them; name the adapter that scores each: --task-family TASK=FAMILY (families: "
                         f"{sorted(set(FAMILY.values()))}), or drop them from --tasks or --methods")
    if run.plan:  # before the SFT sets: nothing is written
        todo = [(m, t) for m in methods for t in tasks if not cells.done(runs, settings, m, t)]
        need = sorted({(m, settings.family_of(t)) for m, t in todo if m in TRAINED})
        show_plan(settings, run, need, todo, runs, batch_size, output, work)
        return []
    sets: dict[str, Path] = {}
    for family in families if trained else []:  # before anything runs: no trained method sees a scored item
        sets[family], bounds, settings.sft_sources[family] = train.sft_set(
            family, settings.sft_examples.get(family), work, run.data_dir, settings.recipe_settings()["data"])
        for task in tasks:
            train.check_disjoint(family, bounds, [task], settings.limit_of(task))
    todo = [(m, t) for m in methods for t in tasks if not cells.done(runs, settings, m, t)]
    need = sorted({(m, settings.family_of(t)) for m, t in todo if m in TRAINED})

    # 2. cells: the untrained methods first (their numbers come before any training time), then each trained
    # method's cells, its family's adapter trained (or reused) right before the first cell that needs it
    order = sorted([(m, t) for m in methods for t in tasks], key=lambda c: (c[0] in TRAINED, methods.index(c[0])))
    paths = [cells.result_path(runs, settings, m, t) for m, t in order]
    for k, ((method, task), path) in enumerate(zip(order, paths), 1):
        if (method, task) not in todo:
            print(f"[cell {k}/{len(order)}] {method} x {task}: done ({path})", flush=True)
    from .scheduler import wants_ray

    served = [c for c in todo if settings.served(*c)]
    server = _served_run(settings, run, vllm_python, device, work) if served else None
    if server is not None:
        print(f"\n{len(served)} of {len(todo)} cells to run decode on vLLM (--serve vllm); the rest in process",
              flush=True)
    with server if server is not None else contextlib.nullcontext():
        if server is not None:
            _preflight(server, settings, served, device)  # before any cell: the server can serve them
        if todo and wants_ray(resources_of(run, output, work)):
            endpoint = server.endpoint() if server is not None else None
            with _gpus_left_to_ray(server, run):
                _run_ray(settings, run, todo, need, sets, work, runs, batch_size, output, endpoint)
            print(f"\nall {len(paths)} cells done in {time.perf_counter() - t_start:.0f} s", flush=True)
            return paths
        for k, (method, task) in enumerate(order, 1):
            if (method, task) not in todo:
                continue
            adapter = None
            if method in TRAINED:
                family = settings.family_of(task)
                if (method, family) not in adapters:
                    done_n = sum(1 for x in need if x in adapters) + 1
                    print(f"\n[train {done_n}/{len(need)}] {method} on the {family} SFT set "
                          f"({time.perf_counter() - t_start:.0f} s so far)", flush=True)
                    adapters[method, family] = train.adapter(settings, method, family, sets[family], work,
                                                                device == "cuda", run.threads)
                adapter = adapters[method, family]
            print(f"\n[cell {k}/{len(order)}] {method} x {task} ({time.perf_counter() - t_start:.0f} s so far)",
                  flush=True)
            score_cell(settings, method, task, runs, work, batch_size, device, adapter, server)
    print(f"\nall {len(paths)} cells done in {time.perf_counter() - t_start:.0f} s", flush=True)
    return paths


def score_cell(settings: Settings, method: str, task: str, runs: Path, work: Path, batch_size: int | str,
               device: str, adapter: Path | None, server: ServedRun | None) -> Path:
    """One cell in this process; a served cell whose server died is rerun once on a restarted server, resuming
    from lm-eval's request cache (``ServedRun.restart``)."""
    from . import cells

    target = server.target(method, task, adapter) if server is not None else None
    try:
        return cells.score(settings, method, task, runs, work, batch_size, device, adapter, target)
    except Exception:
        if target is None or not server.restart():
            raise
    print(f"   {method} x {task}: again on the restarted server (lm-eval's request cache keeps what was answered)",
          flush=True)
    return cells.score(settings, method, task, runs, work, batch_size, device, adapter,
                       server.target(method, task, adapter))


def _served_run(settings: Settings, run: RunOptions, python, device: str, work: Path) -> ServedRun:
    from .serve import ServedRun

    logs = Path(run.serve.log_dir) if run.serve.log_dir else work / "logs"
    return ServedRun(settings, run.serve, python, device, logs)


def _preflight(server: ServedRun, settings: Settings, served: list[tuple[str, str]], device: str) -> None:
    """The server started, and for a served latent cell the stage-2 preflight run once on the base model: a model
    or layout vLLM cannot serve fails here, with the server's or the preflight's message, before any cell."""
    from .config import LAYOUT

    endpoint = server.endpoint()
    if not any(m in LAYOUT for m, _ in served):
        return
    from ..models import load_model
    from ..serving.stage2_vllm import PromptEmbedsBackend
    from ..stopping import eos_ids

    model, tokenizer = load_model(settings.model, device=device)
    try:
        PromptEmbedsBackend(endpoint.url, endpoint.model).preflight(model, tokenizer, eos=eos_ids(model, tokenizer))
    finally:
        del model


class _gpus_left_to_ray:
    """A local Ray started for this run sees the GPUs the server does not take (``serve.split_gpus``)."""

    def __init__(self, server: ServedRun | None, run: RunOptions):
        self.server, self.run, self.saved = server, run, None

    def __enter__(self):
        from .serve import parallel_size, split_gpus, visible_gpus

        if self.server is None or self.run.ray_address or os.environ.get("RAY_ADDRESS"):
            return self
        visible = visible_gpus()
        if visible:
            _, rest = split_gpus(visible, parallel_size(self.server.args))
            self.saved = os.environ.get("CUDA_VISIBLE_DEVICES")
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(rest)
            print(f"== Ray gets GPU(s) {','.join(rest)}; vLLM has {self.server.gpu_env()['CUDA_VISIBLE_DEVICES']}",
                  flush=True)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = self.saved


def show_plan(settings: Settings, run: RunOptions, need: list, todo: list, runs: Path, batch_size: int | str,
              output: Path, work: Path) -> None:
    """``--plan``: the jobs with their resources, memory and time, on the cluster this run would use."""
    from .plan import plan_jobs, show

    show(lambda per_cell, per_training: plan_jobs(settings, need, todo, runs, batch_size, per_cell, per_training,
                                                  run.threads or 1), resources_of(run, output, work))


def worker_device(device: str | None) -> str:
    """The device a job uses where it runs: the GPUs Ray gave it (its ``CUDA_VISIBLE_DEVICES``), else the CPU."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def train_job(settings: Settings, method: str, family: str, data: Path, work: Path, device: str | None,
              threads: int | None) -> Path:
    """One adapter training as a job: DDP over every GPU Ray assigned (``accelerate launch --num_processes k``)."""
    import torch

    from . import train

    device = worker_device(device)
    processes = torch.cuda.device_count() if device == "cuda" else 1
    return train.adapter(settings, method, family, data, work, device == "cuda", threads, max(1, processes))


def cell_job(settings: Settings, method: str, task: str, runs: Path, work: Path, batch_size: int | str,
             device: str | None, endpoint: Endpoint | None = None, adapter: Path | None = None) -> Path:
    """One cell as a job, on the device of the node it landed on; ``endpoint``: the run's vLLM server (its adapter
    registered with it here, by HTTP, once the training job has made it)."""
    from . import cells

    served = endpoint.target(settings, method, task, adapter) if endpoint is not None else None
    return cells.score(settings, method, task, runs, work, batch_size, worker_device(device), adapter, served)


def _run_ray(settings: Settings, run: RunOptions, todo: list, need: list, sets: dict, work: Path,
             runs: Path, batch_size: int | str, output: Path, endpoint: Endpoint | None = None) -> None:
    """The missing adapters and cells as Ray tasks (``scheduler.run_jobs``), the longest cells first; every path
    absolute, since a job may run on another node (the store is shared) or in another directory."""
    from .plan import fit_check, plans_of
    from .scheduler import Job, run_jobs

    work, runs = work.resolve(), runs.resolve()
    logs = work / "logs"
    jobs = []
    for method, family in need:
        jobs.append(Job(f"train {method} ({family})", train_job,
                        (settings, method, family, sets[family].resolve(), work, run.device, run.threads),
                        logs / f"train-{method}-{family}.log", kind="train", what=("train", settings, family)))
    # cost ~ items, and the text MAS writes its upstream notes first (about 3x a single model's time here)
    longest = sorted(todo, key=lambda c: -settings.limit_of(c[1]) * (3 if c[0] in TEXT_METHODS else 1))
    for method, task in longest:
        after = f"train {method} ({settings.family_of(task)})" if method in TRAINED else None
        jobs.append(Job(f"{method} x {task}", cell_job,
                        (settings, method, task, runs, work, batch_size, run.device, endpoint),
                        logs / f"{method}-{task}-{short_hash(settings.cell(method, task))}.log", after,
                        what=("cell", settings, method, task)))
    res = resources_of(run, output, work)
    res.fits = fit_check(lambda per_cell, per_training: plans_of(jobs, runs, batch_size, per_cell, per_training,
                                                                 run.threads or 1))
    run_jobs(jobs, res)
