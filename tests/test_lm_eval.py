"""`lm_eval --model diffmas`: lm-eval's own `hf` model is the oracle for agents=1."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lm_eval import simple_evaluate

from diffmas_eval.latent import AgentChain

GEN = {"max_gen_toks": 12}


def evaluate(model, model_args, tasks, limit=3, **kw):
    return simple_evaluate(model=model, model_args=model_args, tasks=tasks, limit=limit, log_samples=True,
                           gen_kwargs=GEN, device="cpu", **kw)


def samples(results, task):
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


@pytest.mark.parametrize("chat", [False, True])
def test_single_agent_equals_hf(tiny_path, local_data, chat):
    tasks = ["diffmas_arc_challenge", "diffmas_gsm8k"] if not chat else ["diffmas_commonsense_qa_gen"]
    hf = evaluate("hf", f"pretrained={tiny_path},dtype=float32", tasks, apply_chat_template=chat)
    dm = evaluate("diffmas", f"pretrained={tiny_path},agents=1,dtype=float32", tasks,
                  apply_chat_template=chat, batch_size=2)
    for task in tasks:
        for h, d in zip(samples(hf, task), samples(dm, task), strict=True):
            assert h["arguments"] == d["arguments"]
            if h["resps"] and isinstance(h["resps"][0][0], (list, tuple)):  # log-likelihoods
                for (lh, gh), (ld, gd) in zip([r[0] for r in h["resps"]], [r[0] for r in d["resps"]]):
                    assert abs(lh - ld) < 1e-4 and gh == gd
            else:
                assert h["resps"] == d["resps"] and h["resps"][0][0] != ""
        assert hf["results"][task] == dm["results"][task]


def test_upstream_agents_get_the_bare_question_final_agent_the_chat_turn(tiny_path):
    from lm_eval.api.registry import get_model

    lm = get_model("diffmas").create_from_arg_string(f"pretrained={tiny_path},agents=3,latent_steps=1")
    text = lm.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert lm.question(text) == "What is 2+2?"
    assert "Latent thoughts from the planner, critic agent(s)" in text and text.endswith("assistant\n")
    assert lm._final_ids(text, [7, 8]) == [7, 8]  # the note is already inside the chat turn
    context = lm.tok_encode("Question: x")
    plain = lm._final_ids("Question: x", context)
    assert plain[-2:] == context[-2:] and len(plain) > len(context)  # the note precedes a plain context
    assert plain == lm.tok_encode(lm._preamble + "Question: x", add_special_tokens=False)  # one string, as TRL's


def test_multi_agent_run_scores_continuations_over_one_shared_trace_and_context(tiny_path, local_data, monkeypatch):
    calls, prefills = [], []
    stage1, prefill = AgentChain.stage1, AgentChain.prefill
    monkeypatch.setattr(AgentChain, "stage1", lambda self, qs, **kw: calls.append(len(qs)) or stage1(self, qs, **kw))
    monkeypatch.setattr(AgentChain, "prefill",
                        lambda self, t, rows: prefills.append(len(rows)) or prefill(self, t, rows))
    out = evaluate("diffmas", f"pretrained={tiny_path},agents=3,latent_steps=2", ["diffmas_arc_challenge"],
                   limit=3, batch_size=4)
    assert sum(calls) == 3  # one trace per question, not per (question, choice)
    assert sum(prefills) == 3  # and one prefill of its context, every choice scored on from it
    assert 0 <= out["results"]["diffmas_arc_challenge"]["acc,none"] <= 1


def test_plain_cli_finds_diffmas_and_tasks(tiny_path, local_data, tmp_path):
    out = subprocess.run(
        [str(Path(sys.executable).with_name("lm_eval")), "--model", "diffmas",
         "--model_args", f"pretrained={tiny_path},latent_steps=2", "--tasks", "gpqa_diamond", "--limit", "4",
         "--gen_kwargs", "max_gen_toks=8", "--device", "cpu", "--output_path", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=_env(local_data))
    assert out.returncode == 0, out.stderr[-3000:]
    result_files = list(tmp_path.rglob("results_*.json"))
    assert len(result_files) == 1
    results = json.loads(result_files[0].read_text())["results"]["gpqa_diamond"]
    assert 0 <= results["exact_match,none"] <= 1


def test_builtin_models_still_load_after_diffmas():
    code = ("from lm_eval.api.registry import get_model\n"
            "print(get_model('diffmas').__name__, get_model('hf').__name__, get_model('dummy').__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["DiffMASLM", "HFLM", "DummyLM"], out.stderr[-2000:]


class _Killed(Exception):
    pass


def test_interrupted_run_resumes_from_cache(tiny_path, local_data, tmp_path, monkeypatch):
    args = f"pretrained={tiny_path},agents=2,latent_steps=1"
    task = ["diffmas_gsm8k"]
    reference = evaluate("diffmas", args, task, limit=4)
    calls = []
    generate = AgentChain.generate

    def dying(self, *a, **kw):
        if len(calls) == 2:
            raise _Killed
        calls.append(1)
        return generate(self, *a, **kw)

    monkeypatch.setattr(AgentChain, "generate", dying)
    with pytest.raises(_Killed):
        evaluate("diffmas", args, task, limit=4, use_cache=str(tmp_path / "cache"))
    calls.clear()
    monkeypatch.setattr(AgentChain, "generate", lambda self, *a, **kw: calls.append(1) or generate(self, *a, **kw))
    resumed = evaluate("diffmas", args, task, limit=4, use_cache=str(tmp_path / "cache"))
    assert len(calls) == 2  # the two answers computed before the kill came from the cache
    assert resumed["results"] == reference["results"]
    assert [s["resps"] for s in samples(resumed, task[0])] == [s["resps"] for s in samples(reference, task[0])]


def test_unknown_model_arg_lists_the_valid_ones(tiny_path):
    from diffmas_eval.harness.diffmas_lm import DiffMASLM

    expected = r"(?s)unknown diffmas model_args \['latent_step'\]; valid ones:\n.*latent_steps"
    with pytest.raises(ValueError, match=expected):
        DiffMASLM.create_from_arg_string(f"pretrained={tiny_path},latent_step=3")


def _env(data_dir):
    import os

    return {**os.environ, "DIFFMAS_DATA_DIR": str(data_dir)}


def test_loglikelihood_rolling_single_agent_equals_hf_and_runs_over_a_trace(tiny_path):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    text = "The quick brown fox jumps over the lazy dog. " * 30
    req = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    hf = get_model("hf").create_from_arg_string(f"pretrained={tiny_path},dtype=float32,max_length=128",
                                                {"device": "cpu"})
    one = get_model("diffmas").create_from_arg_string(f"pretrained={tiny_path},agents=1,max_length=128",
                                                      {"device": "cpu"})
    expected = hf.loglikelihood_rolling(req, disable_tqdm=True)[0]
    assert abs(one.loglikelihood_rolling(req, disable_tqdm=True)[0] - expected) < 1e-3  # several windows
    multi = get_model("diffmas").create_from_arg_string(f"pretrained={tiny_path},agents=2,latent_steps=1",
                                                        {"device": "cpu"})
    score = multi.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text[:200],), 0)],
                                        disable_tqdm=True)[0]
    assert score < 0 and score == score  # a finite log-probability
