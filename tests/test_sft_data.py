"""SFT sets from the benchmark families never overlap the evaluation items."""

import json

import pytest

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


def test_paper_sources_or_their_offline_fallback(data_dir, tmp_path, capsys):
    """``source="paper"``: the 50 last HumanEval problems (local), MATH's training split from the hub, or,
    where the hub is out of reach (this machine, CI), the offline rows, saying so and reporting it."""
    from diffmas_eval.leaderboard.grid.settings import Settings
    from diffmas_eval.leaderboard.grid.trainings import check_disjoint
    from diffmas_eval.training.data import build_set

    bounds, used = build_set("code", tmp_path / "code.jsonl", data_dir=data_dir, source="paper")
    rows = _prompts(tmp_path / "code.jsonl")
    assert used.startswith("paper") and len(rows) == 50 and bounds == {"humanevalplus": 164 - 50}
    import gzip

    with gzip.open(data_dir / "humanevalplus" / "HumanEvalPlus.jsonl.gz", "rt") as f:
        last = json.loads(f.read().splitlines()[-1])
    assert last["task_id"] == "HumanEval/163" and rows[-1] == {"prompt": last["prompt"],
                                                               "completion": last["canonical_solution"]}
    check_disjoint("code", bounds, ["humanevalplus"], 114)
    with pytest.raises(ValueError, match="humanevalplus: .* at most its first 114 items"):
        check_disjoint("code", bounds, ["humanevalplus"], 115)

    bounds, used = build_set("math", tmp_path / "math.jsonl", n=5, data_dir=data_dir, source="paper")
    rows = _prompts(tmp_path / "math.jsonl")
    if used == "offline":  # no hub: the offline GSM8K rows, and a line that says so
        assert "out of reach" in capsys.readouterr().out and bounds == {"diffmas_gsm8k": 1319 - 5}
        assert rows == [json.loads(line) for line in _offline(data_dir, tmp_path)]
    else:  # the MATH training split: a boxed solution, no test task to stay disjoint from
        assert used == "paper: EleutherAI/hendrycks_math" and bounds == {} and len(rows) == 5
        assert all("\\boxed" in r["completion"] for r in rows)
    # the source used keys the adapter: a fallback never reuses a paper-data adapter
    paper = Settings(recipe="paper", sft_sources={"math": used}).training("diffmas", "math")
    assert paper["sft_source"] == used
    assert Settings(recipe="paper", sft_sources={"math": "elsewhere"}).training("diffmas", "math") != paper
    with pytest.raises(ValueError, match="unknown SFT source 'hub'; choose one of offline, paper"):
        build_set("math", tmp_path / "x.jsonl", data_dir=data_dir, source="hub")


def _offline(data_dir, tmp_path):
    build("math", tmp_path / "offline.jsonl", n=5, data_dir=data_dir)
    return (tmp_path / "offline.jsonl").read_text().splitlines()


def test_chat_rows_are_the_plain_rows_as_a_user_turn_and_the_assistant_answer(data_dir, tmp_path):
    from diffmas_eval.training.data import build_set

    build_set("commonsense", tmp_path / "plain.jsonl", 4, data_dir)
    build_set("commonsense", tmp_path / "chat.jsonl", 4, data_dir, fmt="chat")
    for plain, chat in zip(_prompts(tmp_path / "plain.jsonl"), _prompts(tmp_path / "chat.jsonl"), strict=True):
        assert chat["prompt"] == [{"role": "user", "content": plain["prompt"]}]
        # lm-eval drops the target delimiter under the chat template: the choice follows the generation prompt
        assert chat["completion"] == [{"role": "assistant", "content": plain["completion"][1:]}]
    with pytest.raises(ValueError, match="plain, chat"):
        build_set("commonsense", tmp_path / "x.jsonl", 4, data_dir, fmt="messages")
