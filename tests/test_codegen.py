"""``diffmas-eval codegen``: samples that EvalPlus's own evaluator (a real ``evalplus.evaluate`` subprocess) scores.

Subsets of 1-3 tasks keep EvalPlus's ground-truth computation and its process pool short.
"""

import json

import pytest

from diffmas_eval.codegen import evaluate
from diffmas_eval.codegen.data import configure_offline, load_dataset, task_prompt
from diffmas_eval.codegen.samples import SampleDir
from diffmas_eval.commands.cli import main
from diffmas_eval.prompts import CODE_ROLES, ROLES, TEXT_ROLES, family_roles


@pytest.fixture()
def offline(local_data, monkeypatch):
    for var in ("HUMANEVAL_OVERRIDE_PATH", "MBPP_OVERRIDE_PATH"):
        monkeypatch.delenv(var, raising=False)
    configure_offline()  # monkeypatch restores the variables afterwards
    return local_data


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _run_dir(out, dataset="humaneval"):
    (run,) = (out / dataset).iterdir()
    return run


def _write_and_score(tmp_path, dataset, solution_of, n=3):
    data = load_dataset(dataset)
    tmp_path.mkdir()
    subset = data.subset(n, tmp_path)
    out = SampleDir(tmp_path / "run")
    out.open({"test": True})
    out.write([{"task_id": t["task_id"], "solution": solution_of(t), "raw": solution_of(t),
                "accounting": {"agents": [], "tokens": 0, "seconds": 0.0}} for t in subset.tasks()])
    return evaluate.run(subset, out.samples, parallel=2)


@pytest.mark.parametrize("dataset", ["humaneval", "mbpp"])
def test_canonical_solutions_pass_and_broken_ones_fail(offline, tmp_path, dataset):
    good = _write_and_score(tmp_path / "good", dataset, lambda t: t["prompt"] + t["canonical_solution"])
    assert good == {"base": 1.0, "plus": 1.0, "tasks": 3}
    bad = _write_and_score(tmp_path / "bad", dataset,
                           lambda t: f"def {t['entry_point']}(*args, **kwargs):\n    raise ValueError('broken')\n")
    assert bad == {"base": 0.0, "plus": 0.0, "tasks": 3}


def test_mbpp_prompt_names_the_function(offline):
    """The MBPP+ pre-release keeps the example test apart; the prompt gets its first line, as in v0.2.0."""
    task = load_dataset("mbpp").tasks()[0]
    prompt = task_prompt(task)
    assert task["entry_point"] in prompt and prompt.count("assert") == 1 and prompt.endswith("'''\n")


def test_prompt_is_evalplus_chat_prompt(tiny_path):
    from evalplus.provider.utility import make_raw_chat_prompt
    from lm_eval.models.huggingface import HFLM

    from diffmas_eval.codegen.generate import INSTRUCTION_PREFIX, RESPONSE_PREFIX, build_prompt

    lm = HFLM(pretrained=str(tiny_path), device="cpu")
    task = {"prompt": "def f(x):\n    \"\"\"Return x.\"\"\"\n", "entry_point": "f"}
    expected = make_raw_chat_prompt(task["prompt"], INSTRUCTION_PREFIX, RESPONSE_PREFIX, lm.tokenizer)
    assert build_prompt(lm, "humaneval", task) == expected


def test_code_family_roles():
    code = family_roles("code")
    assert code["planner"] == CODE_ROLES["planner"] and code["planner"] != ROLES["planner"]
    assert family_roles(None) == ROLES and family_roles("code", TEXT_ROLES)["summarizer"] == TEXT_ROLES["summarizer"]
    with pytest.raises(ValueError, match="family='maths' is not valid"):
        family_roles("maths")


def _codegen(tmp_path, *extra, model="hf", model_args=""):
    return main(["codegen", "--model", model, "--model_args", model_args, "--dataset", "humaneval",
                 "--max-new-tokens", "6", "--out", str(tmp_path / "out"), *extra])


@pytest.mark.parametrize("model,args", [("diffmas", "agents=2,latent_steps=2"),
                                        ("textmas", "backend=hf,agents=2,agent_max_tokens=4")])
def test_mas_generation_is_scored(offline, tiny_path, tmp_path, capsys, model, args):
    assert _codegen(tmp_path, "--limit", "2", "--batch-size", "2", "--evaluate", "--parallel", "2",
                    model=model, model_args=f"pretrained={tiny_path},{args}") == 0
    run = _run_dir(tmp_path / "out")
    assert [r["task_id"] for r in _lines(run / "samples.jsonl")] == ["HumanEval/0", "HumanEval/1"]
    assert json.loads((run / "codegen.json").read_text())["family"] == "code"
    acc = _lines(run / "accounting.jsonl")
    assert [a["role"] for a in acc[0]["agents"]] == ["planner", "solver"] and acc[0]["seconds"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["pass@1"]["tasks"] == 2 and 0.0 <= summary["pass@1"]["base"] <= 1.0
    out = capsys.readouterr().out
    assert f"HUMANEVAL_OVERRIDE_PATH={run / 'humaneval-first2.jsonl'} evalplus.evaluate --dataset humaneval" in out
    assert "pass@1 humaneval (base tests)" in out


def test_interrupted_run_resumes_and_reevaluates_with_stdin_closed(offline, tiny_path, tmp_path, capsys):
    args = ("--evaluate", "--parallel", "2")
    model_args = f"pretrained={tiny_path}"
    assert _codegen(tmp_path, "--limit", "1", *args, model_args=model_args) == 0
    run = _run_dir(tmp_path / "out")
    first = (run / "samples.jsonl").read_text()
    with (run / "samples.jsonl").open("a") as f:  # killed while writing the next batch
        f.write('{"task_id": "HumanEval/1", "solu')
    assert _codegen(tmp_path, "--limit", "2", *args, model_args=model_args) == 0
    samples = (run / "samples.jsonl").read_text()
    assert samples.startswith(first) and [r["task_id"] for r in _lines(run / "samples.jsonl")] == [
        "HumanEval/0", "HumanEval/1"]
    assert len(_lines(run / "accounting.jsonl")) == 2  # only the missing task was generated
    assert (run / "samples_eval_results.json.bak").exists()  # the 1-task results, moved aside, not overwritten
    assert json.loads((run / "summary.json").read_text())["pass@1"]["tasks"] == 2
    # nothing left to generate; the results file is current, so it is reused (stdin is closed either way)
    assert _codegen(tmp_path, "--limit", "2", *args, model_args=model_args) == 0
    assert (run / "samples.jsonl").read_text() == samples
    assert "all 2 tasks already have their samples" in capsys.readouterr().out


def test_clear_errors(offline, tiny_path, tmp_path, capsys):
    assert _codegen(tmp_path, "--limit", "400", model_args=f"pretrained={tiny_path}") == 2
    assert "--limit 400 is out of range: humaneval" in capsys.readouterr().err
    assert _codegen(tmp_path, model="no-such-model") == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["codegen", "--model", "hf", "--dataset", "apps", "--out", str(tmp_path)])
    assert "invalid choice: 'apps'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    assert _codegen(tmp_path, "--limit", "1", "--name", "mine", model_args=f"pretrained={tiny_path}") == 0
    samples = tmp_path / "out" / "humaneval" / "mine" / "samples.jsonl"
    before = samples.read_text()
    assert main(["codegen", "--model", "hf", "--model_args", f"pretrained={tiny_path}", "--dataset", "humaneval",
                 "--max-new-tokens", "7", "--limit", "2", "--name", "mine", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "holds samples of a different configuration" in err and "max_new_tokens: 6 there, 7 now" in err
    assert samples.read_text() == before


@pytest.mark.slow
def test_bundled_model(offline, tmp_path):
    assert main(["codegen", "--model", "hf", "--model_args", "pretrained=bundled:smollm2-135m-instruct",
                 "--dataset", "humaneval", "--limit", "1", "--max-new-tokens", "128", "--out", str(tmp_path),
                 "--evaluate", "--parallel", "2"]) == 0
    (run,) = (tmp_path / "humaneval").iterdir()
    (sample,) = _lines(run / "samples.jsonl")
    assert "def has_close_elements" in sample["solution"]  # a real model writes the asked-for function


def test_run_codegen_is_the_command_as_a_function(offline, tiny_path, tmp_path, capsys):
    """``run_codegen`` returns the summary the command writes; the command over the same options reuses its
    samples (same directory name, same configuration)."""
    from diffmas_eval.codegen.cli import CodegenRun, run_codegen

    run = run_codegen("hf", {"pretrained": str(tiny_path)}, "humaneval", out=tmp_path / "out", limit=1,
                      max_new_tokens=6, log=None)
    assert isinstance(run, CodegenRun) and capsys.readouterr().out == ""  # log=None: quiet
    assert run.dir == _run_dir(tmp_path / "out") and run.samples == run.dir / "samples.jsonl"
    assert run.summary == json.loads((run.dir / "summary.json").read_text())
    assert run.summary["tasks"] == 1 and run.pass_at_1 is None  # not evaluated
    assert "evalplus.evaluate --dataset humaneval" in run.command
    assert [r["task_id"] for r in _lines(run.samples)] == ["HumanEval/0"]

    assert _codegen(tmp_path, "--limit", "1", model_args=f"pretrained={tiny_path}") == 0
    out = capsys.readouterr().out
    assert f"all 1 tasks already have their samples in {run.samples}" in out and run.command in out
    with pytest.raises(ValueError, match="--n-samples > 1 needs --temperature > 0"):
        run_codegen("hf", "", "humaneval", out=tmp_path / "x", n_samples=2)
    assert not (tmp_path / "x").exists()
