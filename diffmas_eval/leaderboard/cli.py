"""``diffmas-eval leaderboard``: train, score and compare every method on every task; or collect results made
elsewhere (``--from-results``); or regenerate README's results section (``--readme``)."""

from __future__ import annotations

import argparse
import os
import time
from functools import partial
from pathlib import Path

from ..latent.config import chain_options
from ..options import add_flags, count, parse_pairs
from ..protocol import PROTOCOLS
from .collect import STABILITY_METRICS
from .config import (
    CODE_TASKS,
    DEFAULT_METHODS,
    FAMILY,
    METHODS,
    RECIPES,
    TASKS,
    TEXT_METHODS,
    TRAINED,
    Settings,
    parse_list,
    short_hash,
)

DEFAULT_TASKS = ",".join(TASKS)


def add_leaderboard_parser(sub) -> None:
    d = Settings()
    p = sub.add_parser("leaderboard", help="train, score and compare every method; write CSV, table and charts",
                       description=__doc__)
    p.add_argument("--model", default=d.model, help="hub id, local path or bundled:NAME (default: %(default)s)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)}; "
                        "stitchmas: DiffMAS with segments built apart, trained; latentmas-hier / diffmas-hier: the "
                        "hierarchical chain, untrained / trained; textmas-sft: the text MAS with its final agent "
                        "LoRA-trained over the notes the untrained agents write for the SFT prompts)")
    p.add_argument("--tasks", default=DEFAULT_TASKS,
                   help=f"comma-separated lm-eval task names, and humanevalplus (default: {DEFAULT_TASKS})")
    p.add_argument("--limit", default=str(d.limit), metavar="N[,TASK=N,...]",
                   help="first N items per task (default %(default)s; 0 = all); TASK=N sets one task's count")
    p.add_argument("--protocol", default=d.protocol, choices=sorted(PROTOCOLS),
                   help="decoding: greedy (one answer; the CPU default) | paper (temperature 0.6, top-p 0.95, "
                        "4 samples per question, per-task caps); see protocol.py")
    p.add_argument("--samples", type=int, default=None, help="answers per question (default: the protocol's)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the protocol's)")
    p.add_argument("--top-p", type=float, default=None, help="sampling top-p in (0, 1] (default: the protocol's)")
    p.add_argument("--stability", default=None, metavar="TASK,...",
                   help="tasks whose stability metrics (answer perplexity, entropy) are reported (default: every "
                        "generative task; a log-likelihood task is refused)")
    # the chain's shape, from the schema (textmas, latentmas, diffmas and their variants), with the CPU-sized defaults
    add_flags(p, chain_options(front="leaderboard"), {"agents": d.agents, "latent_steps": d.latent_steps})
    p.add_argument("--agent-max-tokens", type=int, default=d.agent_max_tokens,
                   help="textmas: tokens each upstream agent writes (%(default)s)")
    p.add_argument("--max-gen-toks", type=int, default=None,
                   help="the answer's token budget, every method (default: the protocol's per-task cap; greedy: 96)")
    p.add_argument("--textmas-args", default="",
                   help="extra textmas model_args, e.g. backend=openai,base_url=http://127.0.0.1:8000/v1")
    p.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                   help="score plain prompts (default: the model's chat template, as an instruct model expects)")
    p.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("training (single-sft and diffmas: trainers/sft.py, LoRA, same data/steps/seed)")
    g.add_argument("--recipe", default=d.recipe, choices=sorted(RECIPES),
                   help="offline (the settings below) | paper (LoRA r 8 / alpha 16, AdamW 5e-5, cosine, "
                        "accumulation to 64, epochs over the SFT set: 10 for code)")
    g.add_argument("--train-steps", type=int, default=d.train_steps, help="optimizer steps (%(default)s)")
    g.add_argument("--train-batch-size", type=int, default=d.train_batch_size, help="(%(default)s)")
    g.add_argument("--learning-rate", type=float, default=d.learning_rate, help="(%(default)s)")
    g.add_argument("--lora-r", type=int, default=d.lora_r, help="(%(default)s)")
    g.add_argument("--train-max-length", type=int, default=d.train_max_length,
                   help="tokens per training row (%(default)s)")
    g.add_argument("--task-family", default="", metavar="TASK=FAMILY,...",
                   help="the SFT family (math | commonsense | code) whose adapter scores a task the package does not "
                        "map (any lm-eval task); its disjointness is checked only for the families' own sources")
    g.add_argument("--sft-examples", default="", metavar="FAMILY=N,...",
                   help="SFT set sizes (default: sft-data's 210 math / 700 commonsense / 50 code)")
    p.add_argument("--batch-size", default="8", help="scoring batch size (an integer or auto; %(default)s)")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch here and in training (default: torch's). On a CPU shared with other "
                        "jobs, 1 avoids threads spin-waiting on each other (many times faster there)")
    p.add_argument("--jobs", type=int, default=1,
                   help="cells and trainings run at once, each in its own process with --threads threads (default "
                        "%(default)s). On a CPU, --jobs CORES --threads 1 is the fastest; each job logs to "
                        "WORK_DIR/logs/")
    p.add_argument("--data-dir", default=os.environ.get("DIFFMAS_DATA_DIR"),
                   help="local benchmark data (layout of shared/data); default $DIFFMAS_DATA_DIR, else the hub")
    p.add_argument("--output", default="leaderboards/leaderboard.csv",
                   help="the CSV; leaderboard.md, the charts and runs/ go beside it")
    p.add_argument("--work-dir", default=None, help="SFT sets, adapters, request caches (default: OUTPUT_DIR/cache)")
    p.add_argument("--from-results", nargs="+", metavar="[METHOD=]PATH",
                   help="skip running: collect lm-eval results JSONs / EvalPlus *_eval_results.json (files or "
                        "directories) made anywhere")
    p.add_argument("--skip-bad", action="store_true", help="leave malformed results files out (default: an error)")
    p.add_argument("--readme", default=None, metavar="README.md",
                   help="only regenerate README's results section from the CSV (--output)")
    p.set_defaults(func=run)


def _limits(text: str) -> tuple[int, dict]:
    """``--limit N[,TASK=N,...]``: the default count and per-task counts."""
    per = parse_pairs(text, "--limit", partial(count, zero="every item"), form="N or TASK=N", bare_key="")
    return per.pop("", Settings().limit), per


def _textmas_args(text: str) -> str:
    """``--textmas-args`` as given (the cells' hashes hold the text), once it parses: a malformed item fails
    here, before any training, not in the first textmas cell."""
    parse_pairs(text, "--textmas-args", form="KEY=VALUE")
    return text


def settings_of(args: argparse.Namespace) -> Settings:
    limit, limits = _limits(args.limit)
    return Settings(model=args.model, limit=limit, limits=limits, protocol=args.protocol, samples=args.samples,
                    temperature=args.temperature, top_p=args.top_p, recipe=args.recipe,
                    **{o.name: getattr(args, o.name) for o in chain_options(front="leaderboard")},
                    agent_max_tokens=args.agent_max_tokens, max_gen_toks=args.max_gen_toks,
                    chat_template=args.chat_template, seed=args.seed, textmas_args=_textmas_args(args.textmas_args),
                    train_steps=args.train_steps, train_batch_size=args.train_batch_size,
                    learning_rate=args.learning_rate, lora_r=args.lora_r, train_max_length=args.train_max_length,
                    sft_examples=parse_pairs(args.sft_examples, "--sft-examples", count, form="FAMILY=N"),
                    families=parse_pairs(args.task_family, "--task-family", form="TASK=FAMILY"))


def publish(rows: list[dict], output: Path, curve_rows: list[dict] | None = None) -> None:
    """The CSV, leaderboard.md and the charts, side by side (``curve_rows``: entropy_curve.csv's rows)."""
    from .report import charts, document, write_csv, write_curves

    write_csv(rows, output)
    if curve_rows is not None:
        write_curves(curve_rows, output.parent / "entropy_curve.csv")
    (output.parent / "leaderboard.md").write_text("# Leaderboard\n\n" + document(rows, ""))
    for path in charts(rows, output.parent):
        print(f"wrote {path}")
    print(f"wrote {output} and {output.parent / 'leaderboard.md'}")


def run(args: argparse.Namespace) -> int:
    from .collect import collect, curves
    from .report import markdown, read_csv, update_readme

    output = Path(args.output)
    if args.readme:
        changed = update_readme(Path(args.readme), read_csv(output))
        print(f"{args.readme}: results section {'updated' if changed else 'already up to date'} from {output}")
        return 0
    if args.from_results:
        rows = collect(args.from_results, args.skip_bad)
        if not rows:
            raise ValueError(f"no results in {' '.join(args.from_results)}")
        publish(rows, output, curves(args.from_results))
        print(markdown(rows))
        return 0
    paths = run_all(settings_of(args), args, output)
    rows = collect([str(p) for p in paths])
    if args.stability:
        keep = set(parse_list(args.stability, None, "stability"))
        rows = [r for r in rows if r["metric"] not in STABILITY_METRICS or r["task"] in keep]
    publish(rows, output, curves([str(p) for p in paths]))
    print(markdown(rows))
    return 0


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


def run_all(settings: Settings, args: argparse.Namespace, output: Path) -> list[Path]:
    """Train what is missing, score what is missing; return the results file of every cell."""
    from ..protocol import SAMPLED_TASKS, check_stability_tasks, is_generative
    from . import cells, train

    methods = parse_list(args.methods, METHODS, "methods")
    tasks = parse_list(args.tasks, None, "tasks")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    if settings.limit < 0:
        raise ValueError("--limit must be >= 0 (0 = every item)")
    protocol = settings.decoding()  # before any compute: k, temperature, top-p, the preset's name
    settings.recipe_settings()
    unknown_limits = sorted(set(settings.limits) - set(tasks))
    if unknown_limits:
        raise ValueError(f"--limit names task(s) {', '.join(unknown_limits)} not in --tasks ({', '.join(tasks)})")
    if getattr(args, "stability", None):
        check_stability_tasks(parse_list(args.stability, None, "stability"))
    if protocol.samples > 1:
        unsampled = [t for t in tasks if t not in CODE_TASKS and t not in SAMPLED_TASKS and is_generative(t)]
        if unsampled:
            raise ValueError(f"{', '.join(unsampled)}: {protocol.samples} samples per question are scored for "
                             f"{', '.join([*SAMPLED_TASKS, *CODE_TASKS])} only (log-likelihood tasks are scored once)")
    device, batch_size = run_environment(args.device, args.batch_size, args.data_dir, args.threads)
    runs = output.parent / "runs"
    work = Path(args.work_dir) if args.work_dir else output.parent / "cache"
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
    sets: dict[str, Path] = {}
    for family in families if trained else []:  # before anything runs: no trained method sees a scored item
        sets[family], bounds, settings.sft_sources[family] = train.sft_set(
            family, settings.sft_examples.get(family), work, args.data_dir, settings.recipe_settings()["data"])
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
    if args.jobs > 1:
        _run_pool(settings, args, todo, need, sets, work, runs, batch_size, device)
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
                                                            device == "cuda", args.threads)
            adapter = adapters[method, family]
        print(f"\n[cell {k}/{len(order)}] {method} x {task} ({time.perf_counter() - t_start:.0f} s so far)",
              flush=True)
        cells.score(settings, method, task, runs, work, batch_size, device, adapter)
    print(f"\nall {len(paths)} cells done in {time.perf_counter() - t_start:.0f} s", flush=True)
    return paths


def _run_pool(settings: Settings, args: argparse.Namespace, todo: list, need: list, sets: dict, work: Path,
              runs: Path, batch_size: int | str, device: str) -> None:
    """``--jobs N``: the missing adapters and cells as jobs of ``pool.run_jobs``, the longest cells first."""
    from . import cells, train
    from .pool import Job, run_jobs

    logs = work / "logs"
    jobs = []
    for method, family in need:
        jobs.append(Job(f"train {method} ({family})", train.adapter,
                        (settings, method, family, sets[family], work, device == "cuda", args.threads),
                        logs / f"train-{method}-{family}.log"))
    # cost ~ items, and the text MAS writes its upstream notes first (about 3x a single model's time here)
    longest = sorted(todo, key=lambda c: -settings.limit_of(c[1]) * (3 if c[0] in TEXT_METHODS else 1))
    for method, task in longest:
        after = f"train {method} ({settings.family_of(task)})" if method in TRAINED else None
        jobs.append(Job(f"{method} x {task}", cells.score, (settings, method, task, runs, work, batch_size, device),
                        logs / f"{method}-{task}-{short_hash(settings.cell(method, task))}.log",
                        after))
    run_jobs(jobs, args.jobs, args.threads)
