"""Local benchmark files: the loaders read the shared layout and reject malformed rows by file:line."""

import json

import pytest

from diffmas_eval.tasks import utils


def test_loaders_read_the_shared_data(data_dir, monkeypatch):
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(data_dir))
    sizes = {"aime24": 30, "aime25": 30, "gpqa_diamond": 198, "math500": 500, "gsm8k": 1319,
             "arc_challenge": 1172, "commonsense_qa": 1221}
    for name, n in sizes.items():
        test = getattr(utils, f"load_{name}")()["test"]
        assert len(test) == n and test[0]["question"] and test[0]["answer"]
    gpqa = utils.load_gpqa_diamond()["test"]
    # the correct option lands on every letter (stable shuffle), never always on (A)
    assert set(gpqa["answer"]) == set("ABCD")
    assert utils.load_gpqa_diamond()["test"]["answer"] == gpqa["answer"]


def _write(tmp_path, relative, text):
    path = tmp_path / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_missing_field_names_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(tmp_path))
    path = _write(tmp_path, "gsm8k/test.jsonl",
                  json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps({"question": "q2"}) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: missing field\(s\) \['answer'\]"):
        utils.load_gsm8k()


def test_wrong_answer_letter_names_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(tmp_path))
    row = {"question": "q", "choices": {"label": ["A", "B"], "text": ["x", "y"]}, "answerKey": "A"}
    bad = {**row, "answerKey": "E"}
    path = _write(tmp_path, "arc_challenge/test.jsonl", "\n".join(json.dumps(r) for r in (row, row, bad)) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:3: answerKey 'E' is not one of the choice labels \['A', 'B'\]"):
        utils.load_arc_challenge()


def test_gpqa_csv_problems_name_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(tmp_path))
    header = "Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3\n"
    path = _write(tmp_path, "gpqa_diamond/test.csv", header + "q,a,b,c,d\nq2,a,,c,d\n")
    with pytest.raises(ValueError, match=rf"{path}:3: empty field\(s\) \['Incorrect Answer 1'\]"):
        utils.load_gpqa_diamond()
    _write(tmp_path, "gpqa_diamond/test.csv", "Question,Correct Answer\nq,a\n")
    with pytest.raises(ValueError, match=r"test.csv:1: missing column\(s\)"):
        utils.load_gpqa_diamond()


def test_missing_data_dir_entry_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="aime24/test.jsonl does not exist; point DIFFMAS_DATA_DIR"):
        utils.load_aime24()


def test_arc_numeric_labels_become_letters(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(tmp_path))
    row = {"question": "q", "choices": {"label": ["1", "2", "3"], "text": ["x", "y", "z"]}, "answerKey": "2"}
    _write(tmp_path, "arc_challenge/test.jsonl", json.dumps(row) + "\n")
    doc = utils.load_arc_challenge()["test"][0]
    assert (doc["label"], doc["answer"], doc["letters"]) == (1, "B", ["A", "B", "C"])
    assert utils.process_letter(doc, ["The answer is (B)."]) == {"exact_match": 1}
    assert utils.process_letter(doc, ["The answer is (C)."]) == {"exact_match": 0}
