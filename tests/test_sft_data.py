"""SFT sets from the benchmark families never overlap the evaluation items."""

import json

from diffmas_eval.tasks import utils
from diffmas_eval.training.data import build


def _prompts(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_commonsense_set_is_disjoint_from_what_limit_evaluates(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(data_dir))
    out = tmp_path / "cs.jsonl"
    bounds = build("commonsense", out, n=40)
    rows = _prompts(out)
    assert len(rows) == 40 and all(r["prompt"].startswith("Question: ") and r["completion"] for r in rows)
    for task, loader in (("diffmas_arc_challenge", utils.load_arc_challenge),
                         ("diffmas_commonsense_qa", utils.load_commonsense_qa)):
        docs = loader()["test"]
        assert bounds[task] == len(docs) - 20
        evaluated = {f"Question: {q}\nAnswer:" for q in docs["question"][: bounds[task]]}
        trained = {r["prompt"] for r in rows}
        assert not evaluated & trained
        # the completion is the gold choice, the one the multiple-choice task scores
        last = docs[len(docs) - 1]
        assert {"prompt": f"Question: {last['question']}\nAnswer:",
                "completion": " " + last["choices"][last["label"]]} in rows


def test_math_set_ends_with_a_boxed_answer_the_task_extracts(data_dir, tmp_path):
    out = tmp_path / "math.jsonl"
    bounds = build("math", out, n=5, data_dir=data_dir)
    rows = _prompts(out)
    gold = utils.read_jsonl(data_dir / "gsm8k" / "test.jsonl", ("question", "answer"))[-5:]
    for row, g in zip(rows, gold):
        assert "<<" not in row["completion"]
        doc = {"answer": g["answer"].split("####")[-1].strip().replace(",", "")}
        assert utils.process_number(doc, [row["completion"]]) == {"exact_match": 1}
    assert bounds == {"diffmas_gsm8k": 1319 - 5}
