"""SFT sets (prompt/completion JSONL) from the benchmark families, disjoint from the evaluation items.

The split rule: lm-eval's ``--limit N`` scores the *first* N items of a task, so training takes the
*last* ``n`` rows of each source file. Evaluating with ``--limit`` at most (rows - n) therefore never
touches a training item; ``build`` prints that bound. Prompts are formatted exactly as this
package's lm-eval tasks format them, so the trained final agent sees at evaluation what it saw in
training. Family sizes follow the paper (about 210 math, 700 commonsense, 50 code examples).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..tasks import utils as tasks

FAMILIES = {"math": 210, "commonsense": 700, "code": 50}
MATH_PROMPT = "Question: {q}\nPlease reason step by step, and put your final answer within \\boxed{{}}.\nAnswer:"


def _math(data_dir: Path, n: int) -> tuple[list[dict], dict[str, int]]:
    rows = tasks.read_jsonl(data_dir / "gsm8k" / "test.jsonl", ("question", "answer"))[-n:]
    out = []
    for r in rows:
        work, _, final = r["answer"].rpartition("####")
        work = re.sub(r"<<[^>]*>>", "", work).strip()  # GSM8K's calculator annotations
        out.append({"prompt": MATH_PROMPT.format(q=r["question"]),
                    "completion": f" {work}\nThe answer is \\boxed{{{final.strip().replace(',', '')}}}."})
    return out, {"diffmas_gsm8k": _count(data_dir / "gsm8k" / "test.jsonl") - n}


def _commonsense(data_dir: Path, n: int) -> tuple[list[dict], dict[str, int]]:
    half = n // 2
    out, bounds = [], {}
    for task, relative, k in (("diffmas_arc_challenge", "arc_challenge/test.jsonl", half),
                              ("diffmas_commonsense_qa", "commonsense_qa/validation.jsonl", n - half)):
        path = data_dir / relative
        rows = tasks._choice_rows(path, tasks.read_jsonl(path, ("question", "choices", "answerKey")))[-k:]
        out += [{"prompt": f"Question: {r['question']}\nAnswer:", "completion": " " + r["choices"][r["label"]]}
                for r in rows]
        bounds[task] = _count(path) - k
    return out, bounds


def _code(data_dir: Path, n: int) -> tuple[list[dict], dict[str, int]]:
    path = data_dir / "mbppplus" / "MbppPlus.jsonl"
    rows = tasks.read_jsonl(path, ("prompt", "canonical_solution"))[-n:]
    out = [{"prompt": r["prompt"].strip().strip("'\"").strip() + "\n", "completion": r["canonical_solution"]}
           for r in rows]
    return out, {"mbppplus": _count(path) - n}  # the leaderboard task it must stay disjoint from


def _count(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def build(family: str, out: str | Path, n: int | None = None, data_dir: str | Path | None = None) -> dict[str, int]:
    """Write the family's SFT JSONL; return, per evaluation task, the largest ``--limit`` that stays disjoint."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    data_dir = Path(data_dir or os.environ.get(tasks.DATA_ENV, ""))
    if not str(data_dir) or not data_dir.is_dir():
        raise ValueError("training sets are built from local benchmark files: pass --data-dir or set "
                         "DIFFMAS_DATA_DIR (layout of shared/data)")
    rows, bounds = {"math": _math, "commonsense": _commonsense, "code": _code}[family](data_dir, n or FAMILIES[family])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return bounds
