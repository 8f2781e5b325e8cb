"""The package's tasks, declared once: what each is (generative, multiple choice, code), the SFT family that trains
for it, how its samples are scored, its leaderboard metric, and which tasks a default leaderboard runs.

``protocol.py`` (sampled tasks, code tasks, the paper's token caps) and ``leaderboard/config.py`` (its task list,
families, EvalPlus datasets, metrics) read their tables from here, and so can the Makefile, through the command
line, instead of restating them::

    python -m diffmas_eval.tasks.registry default            # the default leaderboard's tasks, comma-separated
    python -m diffmas_eval.tasks.registry multiple_choice    # those of them scored by log-likelihood
    python -m diffmas_eval.tasks.registry code               # those scored by EvalPlus

(``multiple_choice``/``code``/``generative`` take an optional comma-separated task list to filter instead of the
default one.)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

KINDS = ("generative", "multiple_choice", "code")


@dataclass(frozen=True)
class Task:
    """``kind``: how it is scored (``generative``: lm-eval generate_until; ``multiple_choice``: log-likelihoods;
    ``code``: EvalPlus, ``evalplus`` naming its dataset). ``family``: the SFT set that trains for it.
    ``answer``: how a sampled task's answers are extracted (``tasks/utils.py``; None: not scored per sample).
    ``paper_cap``: the paper protocol's output-token cap. ``default``: in the default leaderboard."""

    name: str
    kind: str
    family: str
    answer: str | None = None
    paper_cap: int | None = None
    metric: str = "exact_match"
    evalplus: str | None = None
    default: bool = False


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("diffmas_gsm8k", "generative", "math", "number", 2048, default=True),
    Task("math500", "generative", "math", "math", 32768, default=True),
    Task("diffmas_aime24", "generative", "math", "math", 20000, default=True),
    Task("diffmas_aime25", "generative", "math", "math", 20000),
    Task("gpqa_diamond", "generative", "math", "letter", 8000, default=True),
    Task("diffmas_arc_challenge", "multiple_choice", "commonsense", metric="acc", default=True),
    Task("diffmas_commonsense_qa", "multiple_choice", "commonsense", metric="acc", default=True),
    Task("diffmas_arc_challenge_gen", "generative", "commonsense", "letter", 2048),
    Task("diffmas_commonsense_qa_gen", "generative", "commonsense", "letter", 2048),
    Task("humanevalplus", "code", "code", paper_cap=4096, metric="pass@1", evalplus="humaneval", default=True),
    Task("mbppplus", "code", "code", paper_cap=4096, metric="pass@1", evalplus="mbpp", default=True),
)}

DEFAULT_TASKS = tuple(n for n, t in TASKS.items() if t.default)
CODE_TASKS = {n: t.evalplus for n, t in TASKS.items() if t.kind == "code"}  # task -> EvalPlus dataset
MULTIPLE_CHOICE_TASKS = tuple(n for n, t in TASKS.items() if t.kind == "multiple_choice")
SAMPLED_TASKS = {n: t.answer for n, t in TASKS.items() if t.answer}  # scored per sample: task -> answer kind
PAPER_CAPS = {n: t.paper_cap for n, t in TASKS.items() if t.paper_cap}
FAMILY = {n: t.family for n, t in TASKS.items()}
PRIMARY = {n: t.metric for n, t in TASKS.items() if t.metric != "exact_match"}


def of_kind(kind: str, tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS) -> list[str]:
    """The tasks of ``tasks`` (default: the default leaderboard's) that are of ``kind``; unknown names are not."""
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}; choose one of {', '.join(KINDS)}")
    return [t for t in tasks if t in TASKS and TASKS[t].kind == kind]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("default", *KINDS):
        print(f"usage: python -m diffmas_eval.tasks.registry default | {' | '.join(KINDS)} [TASK,...]",
              file=sys.stderr)
        return 2
    if args[0] == "default":
        print(",".join(DEFAULT_TASKS))
        return 0
    tasks = [t for t in args[1].split(",") if t] if len(args) > 1 else DEFAULT_TASKS
    print(",".join(of_kind(args[0], tasks)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
