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
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from ..tasks.protocol import SAMPLED_TASKS, check_stability_tasks, is_generative
from .grid.cells import done, result_path
from .grid.plan import fit_check, plan_jobs, plans_of
from .grid.settings import (
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
from .grid.trainings import check_disjoint, sft_set
from .results import compare, training_records
from .results.charts import charts
from .results.collect import STABILITY_METRICS, collect, curves, items
from .results.markdown import document, markdown
from .results.tables import write_csv, write_curves, write_items
from .runner.jobs import (
    cell_job,
    gpus_left_to_ray,
    preflight,
    print_plan,
    refuse_server_beside_cluster,
    rerun_on_restarted,
    run_environment,
    score_cell,
    served_run,
    train_job,
)
from .runner.placement import Placement, resources_of
from .runner.scheduler import Job, run_jobs, wants_ray
from .runner.serve import (
    SERVER_RESOURCE,
    SERVER_SLOTS,
    ServeOptions,
    describe,
    planned_share,
    register,
    server_resources,
    visible_gpus,
)
from .runner.train import train_adapter

if TYPE_CHECKING:
    from .runner.serve import Endpoint


@dataclass
class RunOptions(Placement):
    """Which cells, and how they run. ``methods``, ``tasks``, ``stability``: comma-separated (``config.METHODS``,
    lm-eval task names and the code tasks); ``stability``: the tasks whose stability metrics are kept (None:
    every generative task); ``data_dir``: the local benchmark data (default ``$DIFFMAS_DATA_DIR``, else the hub);
    ``work_dir``: SFT sets, adapters, caches (default: beside the output); where the jobs run: ``Placement``'s
    fields (``runner/placement.py``); ``serve``: the vLLM server that decodes the generative cells (``--serve vllm``,
    ``runner/serve.py``; its backend, version and arguments enter the served cells' hashes through
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

    paired = compare.comparisons(item_rows) if item_rows is not None else None  # refuses unpaired cells, first
    trained, losses = training_records.records([r["adapter"] for r in rows if r.get("adapter")])
    if trained:  # the adapters are here (not a --from-results collection): keep what a reader needs of them
        training_records.write(trained, losses, output.parent)
    write_csv(rows, output)
    if curve_rows is not None:
        write_curves(curve_rows, output.parent / "entropy_curve.csv")
    if item_rows is not None:
        write_items(item_rows, output.parent / "leaderboard_items.csv")
        compare.write(paired or [], output.parent / compare.FILE)
    trained, losses = training_records.read(output.parent)
    (output.parent / "leaderboard.md").write_text("# Leaderboard\n\n" + document(rows, "", paired, trained))
    for path in charts(rows, output.parent, paired, losses):
        print(f"wrote {path}")
    print(f"wrote {output}, {output.parent / 'leaderboard.md'}"
          + (f" and {output.parent / compare.FILE}" if paired is not None else ""))
    print(markdown(rows))




def run_cells(settings: Settings, run: RunOptions, output: Path) -> list[Path]:
    """Train what is missing, score what is missing; return the results file of every cell."""

    methods, tasks = parse_list(run.methods, METHODS, "methods"), parse_list(run.tasks, None, "tasks")
    resources_of(run, output, output.parent)  # the placement flags' own checks, before anything
    if run.serve.backend:
        refuse_server_beside_cluster(run)
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
        todo = [(m, t) for m in methods for t in tasks if not done(runs, settings, m, t)]
        need = sorted({(m, settings.family_of(t)) for m, t in todo if m in TRAINED})
        show_plan(settings, run, need, todo, runs, batch_size, output, work)
        return []
    sets: dict[str, Path] = {}
    for family in families if trained else []:  # before anything runs: no trained method sees a scored item
        sets[family], bounds, settings.sft_sources[family] = sft_set(
            family, settings.sft_examples.get(family), work, run.data_dir, settings.recipe_settings()["data"])
        for task in tasks:
            check_disjoint(family, bounds, [task], settings.limit_of(task))
    todo = [(m, t) for m in methods for t in tasks if not done(runs, settings, m, t)]
    need = sorted({(m, settings.family_of(t)) for m, t in todo if m in TRAINED})

    # 2. cells: the untrained methods first (their numbers come before any training time), then each trained
    # method's cells, its family's adapter trained (or reused) right before the first cell that needs it
    order = sorted([(m, t) for m in methods for t in tasks], key=lambda c: (c[0] in TRAINED, methods.index(c[0])))
    paths = [result_path(runs, settings, m, t) for m, t in order]
    for k, ((method, task), path) in enumerate(zip(order, paths), 1):
        if (method, task) not in todo:
            print(f"[cell {k}/{len(order)}] {method} x {task}: done ({path})", flush=True)

    served = [c for c in todo if settings.served(*c)]
    server = served_run(settings, run.serve, vllm_python, device, work) if served else None
    if server is not None:
        print(f"\n{len(served)} of {len(todo)} cells to run decode on vLLM (--serve vllm); the rest in process",
              flush=True)
    with server if server is not None else contextlib.nullcontext():
        if server is not None:
            preflight(server, settings, served, device)  # before any cell: the server can serve them
        if todo and wants_ray(resources_of(run, output, work)):
            endpoint = server.endpoint() if server is not None else None
            reserved = server.gpu_share() if server is not None else 0.0  # before Ray's GPUs are set apart
            retry = rerun_on_restarted(server) if server is not None else None
            with gpus_left_to_ray(server, run):
                _run_ray(settings, run, todo, need, sets, work, runs, batch_size, output, endpoint, reserved, retry)
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
                    adapters[method, family] = train_adapter(settings, method, family, sets[family], work,
                                                                device == "cuda", run.threads)
                adapter = adapters[method, family]
            print(f"\n[cell {k}/{len(order)}] {method} x {task} ({time.perf_counter() - t_start:.0f} s so far)",
                  flush=True)
            score_cell(settings, method, task, runs, work, batch_size, device, adapter, server)
    print(f"\nall {len(paths)} cells done in {time.perf_counter() - t_start:.0f} s", flush=True)
    return paths










def show_plan(settings: Settings, run: RunOptions, need: list, todo: list, runs: Path, batch_size: int | str,
              output: Path, work: Path) -> None:
    """``--plan``: the jobs with their resources, memory and time, on the cluster this run would use."""

    device = run.device or ("cuda" if visible_gpus() else "cpu")
    print_plan(lambda per_cell, per_training: plan_jobs(settings, need, todo, runs, batch_size, per_cell, per_training,
                                                  run.threads or 1), resources_of(run, output, work),
               planned_share(settings, run.serve, device))








def _run_ray(settings: Settings, run: RunOptions, todo: list, need: list, sets: dict, work: Path,
             runs: Path, batch_size: int | str, output: Path, endpoint: Endpoint | None = None,
             reserved: float = 0.0, retry=None) -> None:
    """The missing adapters and cells as Ray tasks (``scheduler.run_jobs``), the longest cells first; every path
    absolute, since a job may run on another node (the store is shared) or in another directory; ``reserved``:
    what the vLLM server holds of each GPU the jobs use (the fit check counts it); ``retry``: a served cell's rerun
    on a restarted server (``runner.jobs.rerun_on_restarted``). A trained method's adapter is registered with the
    server by this driver once its training ends, before its cells start."""

    work, runs = work.resolve(), runs.resolve()
    logs = work / "logs"
    jobs = []
    for method, family in need:
        served = endpoint is not None and any(m == method and settings.family_of(t) == family and
                                              settings.served(m, t) for m, t in todo)
        jobs.append(Job(f"train {method} ({family})", train_job,
                        (settings, method, family, sets[family].resolve(), work, run.device, run.threads),
                        logs / f"train-{method}-{family}.log", kind="train", what=("train", settings, family),
                        then=partial(register, endpoint.url) if served else None))
    # cost ~ items, and the text MAS writes its upstream notes first (about 3x a single model's time here)
    longest = sorted(todo, key=lambda c: -settings.limit_of(c[1]) * (3 if c[0] in TEXT_METHODS else 1))
    for method, task in longest:
        after = f"train {method} ({settings.family_of(task)})" if method in TRAINED else None
        jobs.append(Job(f"{method} x {task}", cell_job,
                        (settings, method, task, runs, work, batch_size, run.device, endpoint),
                        logs / f"{method}-{task}-{short_hash(settings.cell(method, task))}.log", after,
                        what=("cell", settings, method, task),
                        resources=server_resources(method) if endpoint and settings.served(method, task) else {}))
    res = resources_of(run, output, work)
    res.fits = fit_check(lambda per_cell, per_training: plans_of(jobs, runs, batch_size, per_cell, per_training,
                                                                 run.threads or 1), reserved)
    res.retry = retry
    res.custom = {SERVER_RESOURCE: SERVER_SLOTS} if endpoint is not None else {}
    run_jobs(jobs, res)
