"""``diffmas-eval``: ask a DiffMAS chain one question; the trace memory of a model; build the leaderboard and the
ablations; generate code for EvalPlus; print the option reference."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import DEFAULT_MODEL
from ..ask import ask as ask_chain
from ..ask import build_trained, format_trace_table
from ..codegen.cli import add_codegen_parser
from ..extras import MissingExtra
from ..latent.config import LatentConfig, chain_options
from ..latent.persist import load_trained_chain
from ..leaderboard import add_leaderboard_parser
from ..leaderboard.cli import add_ablate_parser
from ..memory import format_memory, trace_memory
from .options import add_flags, given_options, parse_counts


def add_chain_args(p: argparse.ArgumentParser, config_class: type[LatentConfig] | None = None) -> None:
    """The model flags, then one flag per chain option offered to ``ask`` (``latent.config.chain_options``:
    names, types, defaults, choices and help come from there; ``latent_steps`` is ``--latent-steps``).
    ``config_class``: a ``LatentConfig`` subclass whose extra options become flags too."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local path or bundled:NAME (default: %(default)s)")
    p.add_argument("--peft", default=None, help="a PEFT adapter on top of the model: a folder (trainers/sft.py's "
                   "output_dir) or a Hub repo id; the chain it was trained with (diffmas.json) applies")
    add_flags(p, chain_options(config_class or LatentConfig, front="ask"), trained=True)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)


def chain_of(args: argparse.Namespace, config_class: type[LatentConfig] | None = None):
    """The chain the ``add_chain_args`` flags describe: the ``--peft`` adapter's trained chain (or the defaults), the
    flags given overriding it (``latent.persist.load_trained_chain``; its options checked before the model loads)."""
    config_class = config_class or LatentConfig
    options = chain_options(config_class, front="ask")
    values = {o.name: getattr(args, o.name) for o in options}
    values.update(given_options(args, [o.name for o in options if o.saved or o.name == "agents"]))
    trained = load_trained_chain(args.peft, config_class=config_class, **values)  # once: options checked here
    return build_trained(trained, args.model, dtype=args.dtype, device=args.device, seed=args.seed)


def ask(args: argparse.Namespace) -> int:
    answer = ask_chain(chain_of(args), args.question, args.max_new_tokens)
    print(answer.text.strip())
    print()
    print(format_trace_table(answer.trace))
    print(f"\nstage 1: {answer.stage1_seconds:.2f} s   stage 2: {answer.stage2_seconds:.2f} s "
          f"({len(answer.token_ids)} tokens)")
    return 0


def sft_data(args: argparse.Namespace) -> int:
    from ..training.data import build_set  # start-up time: datasets, for sft-data alone

    bounds, used = build_set(args.family, args.out, args.n, args.data_dir, args.source, args.format)
    held = ", ".join(f"{t} --limit <= {b}" for t, b in bounds.items()) or "nothing (a training split)"
    print(f"wrote {args.out} (source: {used}); held out for evaluation: {held}")
    return 0


def memory(args: argparse.Namespace) -> int:
    prompts = parse_counts(args.prompt_tokens, "--prompt-tokens")
    m = trace_memory(args.model, args.agents, args.latent_steps, prompts[0] if len(prompts) == 1 else prompts,
                     args.final_tokens, args.dtype)
    print(json.dumps(m.as_dict()) if args.json else format_memory(m))
    return 0


def options(args: argparse.Namespace) -> int:
    from .reference import options_reference, update_options  # start-up time: lm_eval (the harness)

    if args.readme is None:
        print(options_reference(), end="")
        return 0
    changed = update_options(Path(args.readme))
    print(f"{args.readme}: generated sections {'updated' if changed else 'already up to date'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Every ``diffmas-eval`` subcommand and flag (``main`` parses with it; ``tests/test_docs.py`` checks the
    documented command lines against it)."""
    parser = argparse.ArgumentParser(prog="diffmas-eval", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_ask = sub.add_parser("ask", help="run the chain on one question; print the answer and the trace")
    p_ask.add_argument("question")
    p_ask.add_argument("--max-new-tokens", type=int, default=256)
    add_chain_args(p_ask)
    p_ask.set_defaults(func=ask)

    p_data = sub.add_parser("sft-data", help="write an SFT set (prompt/completion JSONL) disjoint from evaluation")
    p_data.add_argument("--family", required=True, choices=["math", "commonsense", "code"])
    p_data.add_argument("--out", required=True)
    p_data.add_argument("--n", type=int, default=None, help="examples (default: the paper's 210/700/50)")
    p_data.add_argument("--source", default="offline", choices=["offline", "paper"],
                        help="offline: the last rows of the local benchmark files | paper: MATH train and "
                             "CommonsenseQA train from the hub, the last 50 HumanEval problems (offline rows when "
                             "the hub is out of reach)")
    p_data.add_argument("--data-dir", default=None, help="local benchmark data; default $DIFFMAS_DATA_DIR")
    p_data.add_argument("--format", default="plain", choices=["plain", "chat"],
                        help="plain: prompt/completion strings, for scoring without a chat template | chat: the "
                             "prompt as a user turn and the completion as the assistant's, for scoring with "
                             "--apply_chat_template (TRL applies the model's template)")
    p_data.set_defaults(func=sft_data)

    p_mem = sub.add_parser("memory", help="trace bytes per position and per question, from the model config only")
    p_mem.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local path or bundled:NAME")
    add_flags(p_mem, chain_options(front="memory"))
    p_mem.add_argument("--prompt-tokens", default="200",
                       help="tokens of each upstream agent's prompt (role + question), or one per upstream agent "
                            "comma-separated (default: 200)")
    p_mem.add_argument("--final-tokens", type=int, default=0,
                       help="the final agent's prompt + answer tokens, held on top of the trace in stage 2")
    p_mem.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p_mem.add_argument("--json", action="store_true", help="print one JSON object")
    p_mem.set_defaults(func=memory)

    p_opt = sub.add_parser("options", help="the option reference: every chain option and model_arg, and the front "
                                          "ends that offer each (docs/options.md is this list)")
    p_opt.add_argument("--readme", default=None, metavar="PAGE.md",
                       help="regenerate the option reference of docs/options.md (between its options markers) "
                            "instead of printing")
    p_opt.set_defaults(func=options)

    add_leaderboard_parser(sub)
    add_ablate_parser(sub)
    add_codegen_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, MissingExtra) as err:  # bad input, a missing extra: one clear line, no traceback
        print(f"diffmas-eval: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
