"""SFT sets (prompt/completion JSONL) from the benchmark families, disjoint from the evaluation items.

The split rule: lm-eval's ``--limit N`` scores the *first* N items of a task, so training takes the
*last* ``n`` rows of each source file. Evaluating with ``--limit`` at most (rows - n) therefore never
touches a training item; ``build`` prints that bound. Prompts are formatted exactly as this
package's lm-eval tasks format them, so the trained final agent sees at evaluation what it saw in
training. Family sizes follow the paper (about 210 math, 700 commonsense, 50 code examples).

Two formats (``to_chat``): ``plain`` rows (prompt and completion strings, which TRL trains without a chat
template) for cells scored on plain text, and ``chat`` rows (the prompt as one user turn, the completion as the
assistant's turn, which TRL renders with the model's chat template) for cells scored with
``--apply_chat_template``: lm-eval then sends the task's text as the one user turn and scores the completion after
the generation prompt, so a chat-trained agent reads at scoring the tokens it was trained on. The code family
stays plain (``CHAT_FAMILIES``).

Two sources (``source=``): ``offline``, the last rows of the local benchmark files above; and ``paper``, the
DiffMAS paper's: math from the MATH training split (hub ``EleutherAI/hendrycks_math``, disjoint from MATH-500,
which is drawn from the test split), commonsense from CommonsenseQA's training split (hub
``tau/commonsense_qa``; the task scores its validation split), code from the last 50 HumanEval problems (so
HumanEval+ may score its first 114). When the hub cannot be reached the paper source falls back to the offline
rows for that family, says so, and reports which source it used, so a leaderboard keys its adapters by the
data they really saw.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import uuid
from pathlib import Path

from datasets import load_dataset

from ..extras import require
from ..tasks import utils as tasks

FAMILIES = {"math": 210, "commonsense": 700, "code": 50}
SOURCES = ("offline", "paper")
MATH_HUB = ("EleutherAI/hendrycks_math", ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                                          "number_theory", "prealgebra", "precalculus"))
COMMONSENSE_HUB = "tau/commonsense_qa"
FORMATS = ("plain", "chat")
# the families whose tasks lm-eval scores (with or without its chat template); the code family is scored by
# EvalPlus's instruction prompt (codegen/generate.py), whose rows are not these yet
CHAT_FAMILIES = ("math", "commonsense")
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


def choice_row(doc: dict) -> dict:
    """A multiple-choice item (``tasks.choice_rows``) as its task prompts it (``doc_to_text``) and scores its gold
    choice (lm-eval's target delimiter, a space, then the choice)."""
    return {"prompt": f"Question: {doc['question']}\nAnswer:", "completion": " " + doc["choices"][doc["label"]]}


def _commonsense(data_dir: Path, n: int) -> tuple[list[dict], dict[str, int]]:
    half = n // 2
    out, bounds = [], {}
    for task, relative, k in (("diffmas_arc_challenge", "arc_challenge/test.jsonl", half),
                              ("diffmas_commonsense_qa", "commonsense_qa/validation.jsonl", n - half)):
        path = data_dir / relative
        rows = tasks.choice_rows(path, tasks.read_jsonl(path, ("question", "choices", "answerKey")))[-k:]
        out += [choice_row(r) for r in rows]
        bounds[task] = _count(path) - k
    return out, bounds


def _code(data_dir: Path, n: int) -> tuple[list[dict], dict[str, int]]:
    path = data_dir / "mbppplus" / "MbppPlus.jsonl"
    rows = tasks.read_jsonl(path, ("prompt", "canonical_solution"))[-n:]
    out = [{"prompt": r["prompt"].strip().strip("'\"").strip() + "\n", "completion": r["canonical_solution"]}
           for r in rows]
    return out, {"mbppplus": _count(path) - n}  # the leaderboard task it must stay disjoint from


def _sample(rows: list, n: int) -> list:
    """``n`` rows spread over the whole split (a fixed seed: the same set on every machine)."""
    return random.Random(0).sample(rows, min(n, len(rows)))


def _paper_math(data_dir: Path, n: int) -> tuple[list[dict], dict[str, int]]:
    name, subjects = MATH_HUB
    rows = [r for subject in subjects for r in load_dataset(name, subject, split="train")]
    out = [{"prompt": MATH_PROMPT.format(q=r["problem"]), "completion": " " + r["solution"].strip()}
           for r in _sample(rows, n)]
    return out, {}  # the training split: no test task shares its items


def _paper_commonsense(data_dir: Path, n: int) -> tuple[list[dict], dict[str, int]]:
    rows = tasks.choice_rows(None, _sample(list(load_dataset(COMMONSENSE_HUB, split="train")), n))
    return [choice_row(r) for r in rows], {}


def _paper_code(data_dir: Path, n: int) -> tuple[list[dict], dict[str, int]]:
    local = data_dir / "humanevalplus" / "HumanEvalPlus.jsonl.gz"
    if local.exists():
        with gzip.open(local, "rt", encoding="utf-8") as f:
            problems = [json.loads(line) for line in f if line.strip()]
    else:  # EvalPlus fetches its release itself

        require("evalplus")
        from evalplus.data import get_human_eval_plus  # optional extra: codegen

        problems = list(get_human_eval_plus().values())
    rows = problems[-n:]
    return ([{"prompt": r["prompt"], "completion": r["canonical_solution"]} for r in rows],
            {"humanevalplus": len(problems) - len(rows)})


PAPER = {"math": (_paper_math, MATH_HUB[0]), "commonsense": (_paper_commonsense, COMMONSENSE_HUB),
         "code": (_paper_code, "HumanEval (last problems)")}


def _count(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def to_chat(row: dict) -> dict:
    """A plain row as TRL's conversational prompt/completion: the prompt text as the one user turn (where lm-eval's
    ``--apply_chat_template`` puts a zero-shot task's text: no system turn, no few-shot turns), the completion as
    the assistant's turn without its leading space: under the chat template lm-eval drops a multiple-choice task's
    target delimiter (``Task.construct_requests``: the choice follows the generation prompt directly), and a
    generated answer starts there too."""
    if not isinstance(row["prompt"], str):
        return row  # already conversational
    return {**row, "prompt": [{"role": "user", "content": row["prompt"]}],
            "completion": [{"role": "assistant", "content": row["completion"].lstrip(" ")}]}


def write_chat(source: Path, out: Path) -> Path:
    """``source``'s rows as chat rows (``to_chat``), written to ``out``. Every training job of a family writes the
    same file, two at a time on a shared store: each through a temporary file of its own (a shared one was moved
    away under the other job's rename), then an atomic replace of identical contents."""
    rows = [json.loads(line) for line in Path(source).read_text().splitlines() if line.strip()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text("".join(json.dumps(to_chat(r)) + "\n" for r in rows))
    tmp.replace(out)
    return out


def build(family: str, out: str | Path, n: int | None = None, data_dir: str | Path | None = None,
          source: str = "offline") -> dict[str, int]:
    """Write the family's SFT JSONL; return, per evaluation task, the largest ``--limit`` that stays disjoint."""
    return build_set(family, out, n, data_dir, source)[0]


def build_set(family: str, out: str | Path, n: int | None = None, data_dir: str | Path | None = None,
              source: str = "offline", fmt: str = "plain") -> tuple[dict[str, int], str]:
    """``build``, also returning the source the rows came from (``paper`` falls back to ``offline``);
    ``fmt``: ``plain`` or ``chat`` rows (``to_chat``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown SFT format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if source not in SOURCES:
        raise ValueError(f"unknown SFT source {source!r}; choose one of {', '.join(SOURCES)}")
    data_dir = Path(data_dir or os.environ.get(tasks.DATA_ENV, ""))
    have_local = bool(str(data_dir)) and data_dir.is_dir()
    n = n or FAMILIES[family]
    rows = None
    if source == "paper":
        make, where = PAPER[family]
        try:
            rows, bounds = make(data_dir, n)
            used = f"paper: {where}"
        except (OSError, ImportError) as err:  # datasets' ConnectionError is an OSError: the hub is out of reach
            print(f"SFT set {family}: the paper's source {where} is out of reach ({type(err).__name__}: "
                  f"{str(err)[:200]}); using the offline set instead", flush=True)
    if rows is None:
        if not have_local:
            raise ValueError("the offline training sets are built from local benchmark files: pass --data-dir or "
                             "set DIFFMAS_DATA_DIR (layout of shared/data)")
        rows, bounds = {"math": _math, "commonsense": _commonsense, "code": _code}[family](data_dir, n)
        used = "offline"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(to_chat(r) if fmt == "chat" else r) + "\n" for r in rows))
    return bounds, used
