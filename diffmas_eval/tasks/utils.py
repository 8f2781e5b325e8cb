"""Data loading and scoring for the lm-eval tasks (YAMLs in the top-level ``tasks/`` folder).

Each loader reads the hub by default and, when ``DIFFMAS_DATA_DIR`` is set, the local files in the
layout of ``../shared/data`` (offline machines). Local rows are validated, and a bad row fails
with its file and line, since a silently skipped or mis-keyed row would change the score.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from pathlib import Path

import datasets

from diffmas_eval.answers import extract_letter, extract_number, last_boxed, math_equal, normalize_math
from diffmas_eval.stability import sample_metrics

DATA_ENV = "DIFFMAS_DATA_DIR"


def _local(relative: str) -> Path | None:
    root = os.environ.get(DATA_ENV)
    if not root:
        return None
    path = Path(root) / relative
    if not path.exists():
        raise FileNotFoundError(f"{DATA_ENV}={root} but {path} does not exist; point {DATA_ENV} at a directory "
                                "in the layout of shared/data (one folder per benchmark), or unset it for the hub")
    return path


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            missing = [k for k in required if k not in row or row[k] in (None, "")]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing field(s) {missing}; each row needs {list(required)}")
            rows.append(row)
    return rows


def _split(rows: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _hub(path: str, name: str | None, split: str) -> datasets.Dataset:
    return datasets.load_dataset(path, name, split=split)


# -- math ----------------------------------------------------------------------------------------
def _load_qa(relative: str, hub: tuple[str, str | None, str], hub_fields: tuple[str, str]) -> datasets.DatasetDict:
    """Question/answer benchmarks: local files use ``question``/``answer``, hub copies their own names."""
    local = _local(relative)
    if local:
        return _split([{"question": r["question"], "answer": str(r["answer"])}
                       for r in read_jsonl(local, ("question", "answer"))])
    q, a = hub_fields
    return _split([{"question": r[q], "answer": str(r[a])} for r in _hub(*hub)])


def load_aime24(**_) -> datasets.DatasetDict:
    return _load_qa("aime24/test.jsonl", ("Maxwell-Jia/AIME_2024", None, "train"), ("Problem", "Answer"))


def load_aime25(**_) -> datasets.DatasetDict:
    return _load_qa("aime25/test.jsonl", ("math-ai/aime25", None, "test"), ("problem", "answer"))


def load_gsm8k(**_) -> datasets.DatasetDict:
    local = _local("gsm8k/test.jsonl")
    rows = read_jsonl(local, ("question", "answer")) if local else list(_hub("openai/gsm8k", "main", "test"))
    return _split([{"question": r["question"], "answer": r["answer"].split("####")[-1].strip().replace(",", "")}
                   for r in rows])


def load_math500(**_) -> datasets.DatasetDict:
    local = _local("math500/test.jsonl")
    rows = read_jsonl(local, ("problem", "answer")) if local else list(_hub("HuggingFaceH4/MATH-500", None, "test"))
    return _split([{"question": r["problem"], "answer": r["answer"]} for r in rows])


# -- multiple choice -----------------------------------------------------------------------------
def choice_rows(path: Path | None, rows: list[dict]) -> list[dict]:
    out = []
    for i, r in enumerate(rows, 1):
        labels, texts = list(r["choices"]["label"]), list(r["choices"]["text"])
        key = str(r["answerKey"])
        if key not in labels:
            where = f"{path}:{i}" if path else f"row {i}"
            raise ValueError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
        # some ARC rows label choices 1-4: letters keep prompts and extraction uniform
        letters = [chr(ord("A") + j) for j in range(len(labels))]
        out.append({"question": r["question"], "choices": texts, "letters": letters,
                    "label": labels.index(key), "answer": letters[labels.index(key)]})
    return out


def _load_choices(relative: str, hub: tuple[str, str | None, str]) -> datasets.DatasetDict:
    local = _local(relative)
    rows = read_jsonl(local, ("question", "choices", "answerKey")) if local else list(_hub(*hub))
    return _split(choice_rows(local, rows))


def load_arc_challenge(**_) -> datasets.DatasetDict:
    return _load_choices("arc_challenge/test.jsonl", ("allenai/ai2_arc", "ARC-Challenge", "test"))


def load_commonsense_qa(**_) -> datasets.DatasetDict:
    return _load_choices("commonsense_qa/validation.jsonl", ("tau/commonsense_qa", None, "validation"))


GPQA_COLUMNS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")


def load_gpqa_diamond(**_) -> datasets.DatasetDict:
    """GPQA-Diamond with the four options shuffled by a per-question seed (stable across runs)."""
    local = _local("gpqa_diamond/test.csv")
    if local:
        with open(local, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in GPQA_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{local}:1: missing column(s) {missing}; the header needs {list(GPQA_COLUMNS)}")
            rows = []
            for r in reader:
                empty = [c for c in GPQA_COLUMNS if not (r.get(c) or "").strip()]
                if empty:
                    raise ValueError(f"{local}:{reader.line_num}: empty field(s) {empty}")
                rows.append(r)
    else:
        rows = list(_hub("Idavidrein/gpqa", "gpqa_diamond", "train"))
    out = []
    for r in rows:
        options = [r[c].strip() for c in GPQA_COLUMNS[1:]]
        order = list(range(4))
        random.Random(hashlib.sha256(r["Question"].encode()).hexdigest()).shuffle(order)
        out.append({"question": r["Question"].strip(), "choices": [options[j] for j in order],
                    "answer": "ABCD"[order.index(0)]})
    return _split(out)


# -- scoring ---------------------------------------------------------------------------------------
# One answer (``results[0]`` a string) gives ``exact_match``. With lm-eval ``repeats: k`` and the
# ``take_first_k`` filter (``protocol.task_config``) ``results[0]`` is the list of k samples: each is
# scored alone and ``stability.sample_metrics`` gives the per-question pass@1 mean and consistency.
def _score(ok: bool) -> dict[str, int]:
    return {"exact_match": int(ok)}


def _per_sample(score):
    def process(doc: dict, results: list) -> dict:
        if isinstance(results[0], (list, tuple)):
            return sample_metrics([score(doc, r) for r in results[0]])
        return _score(score(doc, results[0]))

    process.__name__ = process.__qualname__ = f"process_{score.__name__.removeprefix('_')}"
    process.__doc__ = f"lm-eval process_results: {score.__doc__}"
    return process


def _number_answer(doc: dict, text: str) -> str | None:
    return extract_number(text)


def _math_answer(doc: dict, text: str) -> str | None:
    boxed = last_boxed(text)
    found = boxed if boxed is not None else extract_number(text)
    return None if found is None else normalize_math(found)


def _letter_answer(doc: dict, text: str) -> str | None:
    return extract_letter(text, "".join(doc.get("letters") or "ABCD"))


def _number(doc: dict, text: str) -> bool:
    """the final number equals the answer."""
    pred = _number_answer(doc, text)
    return pred is not None and math_equal(pred, doc["answer"])


def _math(doc: dict, text: str) -> bool:
    """the last boxed expression (else the final number) equals the answer."""
    return math_equal(_math_answer(doc, text), doc["answer"])


def _letter(doc: dict, text: str) -> bool:
    """the chosen option letter is the answer."""
    return _letter_answer(doc, text) == doc["answer"]


process_number, process_math, process_letter = _per_sample(_number), _per_sample(_math), _per_sample(_letter)


def _answers(extract):
    """An lm-eval ``custom`` filter: each sample -> its extracted answer as ``\\boxed{...}`` (so the task's own
    scorer reads it back unchanged; an unanswered sample is ""), for ``majority_vote`` to count."""
    def filter_fn(resps, docs):
        return [[("\\boxed{" + a + "}") if (a := extract(doc, r)) is not None else "" for r in rs]
                for rs, doc in zip(resps, docs)]

    return filter_fn


ANSWER_FILTERS = {"number": _answers(_number_answer), "math": _answers(_math_answer),
                  "letter": _answers(_letter_answer)}
answers_number, answers_math, answers_letter = (ANSWER_FILTERS[k] for k in ("number", "math", "letter"))
