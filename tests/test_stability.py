"""Decoding stability and repeated samples (``stability.py``, ``protocol.py``).

Tolerance: the stability log-probs are the decoder's own float32 logits; a teacher-forced forward over
the same tokens differs only by the order of float32 reductions (measured floor: 2.4e-6 on the tiny
models, a few 1e-6 on SmolLM2), so 1e-4 is the issue's bound with a wide margin.
"""

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.filter import FilterEnsemble
from lm_eval.filters import build_filter_ensemble

from diffmas_eval.harness.common import add_accounting
from diffmas_eval.latent import AgentChain, LatentConfig
from diffmas_eval.stability import AnswerStats, consistency_table, summarise
from diffmas_eval.tasks.protocol import check_stability_tasks, get_protocol, task_config
from diffmas_eval.tasks.utils import process_letter, process_number
from tests.conftest import QUESTIONS

ATOL = 1e-4


def _teacher_forced(logits: torch.Tensor, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(logits.float(), -1)
    return logp.gather(-1, torch.tensor(tokens)[:, None])[:, 0], torch.special.entr(logp.exp()).sum(-1)


@pytest.fixture(scope="module")
def bundled():
    from diffmas_eval.models import load_model

    return load_model("bundled:smollm2-135m-instruct", dtype="float32")


@pytest.mark.parametrize("do_sample", [False, True])
def test_chain_stats_equal_a_teacher_forced_recomputation(bundled, do_sample):
    model, tok = bundled
    chain = AgentChain(model, tok, LatentConfig(roles=["planner", "critic", "solver"], latent_steps=2))
    finals = [chain.final_prompt(q) for q in QUESTIONS[:2]]  # different lengths: a padded batch
    with torch.no_grad():
        trace = chain.stage1(QUESTIONS[:2])
        gens = chain.generate(trace, finals, max_new_tokens=10, do_sample=do_sample, temperature=0.6, top_p=0.95,
                              generator=torch.Generator().manual_seed(0), stop=["\n\n"])
        for i, gen in enumerate(gens):
            n = len(gen.token_ids)
            assert n > 0 and len(gen.stats.logprobs) == len(gen.stats.entropies) == n
            logits, ends = chain.final_logits(trace.select([i]), [finals[i] + gen.token_ids])
            logp, ent = _teacher_forced(logits[0, int(ends[0]) - n - 1:int(ends[0]) - 1], gen.token_ids)
            assert (logp - torch.tensor(gen.stats.logprobs)).abs().max() < ATOL
            assert (ent - torch.tensor(gen.stats.entropies)).abs().max() < ATOL
            assert gen.stats.stopped in ("eos", "stop", "length")
            assert abs(gen.stats.perplexity - torch.exp(-logp.mean()).item()) < 1e-3 * gen.stats.perplexity


def test_hf_final_agent_stats_equal_a_teacher_forced_recomputation_and_change_no_answer(bundled):
    from lm_eval.models.huggingface import HFLM

    from diffmas_eval.harness.textmas_lm import FinalAgentLM, _Req
    from diffmas_eval.models import resolve_pretrained

    model, tok = bundled
    path = resolve_pretrained("bundled:smollm2-135m-instruct")
    lm = FinalAgentLM(pretrained=model, tokenizer=tok, batch_size=2, device="cpu")
    outs = []
    generate = lm.model.generate
    lm.model.generate = lambda *a, **kw: outs.append((kw["input_ids"], r := generate(*a, **kw))) or r
    contexts = ["Question: What is 12 + 30?\nAnswer:", "Question: Name a colour of the sky on a clear day.\nAnswer:"]
    gen = {"until": ["Question:"], "max_gen_toks": 12, "do_sample": False}
    texts = lm.generate_until([_Req((c, dict(gen))) for c in contexts], disable_tqdm=True)
    hf = HFLM(pretrained=path, batch_size=2, device="cpu", dtype="float32")
    assert texts == hf.generate_until([_Req((c, dict(gen))) for c in contexts], disable_tqdm=True)
    (context, out), = outs
    checked = 0
    for text, ctx_row, row in zip(lm._batch, context.tolist(), out[:, context.shape[1]:].tolist()):
        stats = lm.stats[text][0]
        answer = row[:len(stats.logprobs)]
        ids = list(ctx_row)
        while ids[0] == tok.pad_token_id:  # the batch is left-padded
            ids.pop(0)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + answer])).logits[0]
        logp, ent = _teacher_forced(logits[len(ids) - 1:len(ids) + len(answer) - 1], answer)
        assert len(answer) > 0
        assert (logp - torch.tensor(stats.logprobs)).abs().max() < ATOL
        assert (ent - torch.tensor(stats.entropies)).abs().max() < ATOL
        checked += 1
    assert checked == 2


def _run(model_args, cfg, limit=2):
    return simple_evaluate(model="diffmas", model_args=model_args, tasks=[cfg], limit=limit, log_samples=True,
                           device="cpu", batch_size=4, random_seed=1234, numpy_random_seed=1234, torch_random_seed=1234)


def test_k4_sampling_with_a_fixed_seed_is_reproducible_and_logged_per_sample(tiny_path, local_data):
    cfg = task_config("diffmas_gsm8k", get_protocol("paper"), max_gen_toks=6)
    args = f"pretrained={tiny_path},agents=1"
    first, again = _run(args, cfg), _run(args, cfg)
    a = add_accounting("diffmas_gsm8k", first["samples"]["diffmas_gsm8k"])
    b = again["samples"]["diffmas_gsm8k"]
    assert [s["resps"] for s in a] == [s["resps"] for s in b]
    assert all(len(s["resps"][0]) == 4 for s in a)  # one request, four answers
    assert any(len(set(s["resps"][0])) > 1 for s in a)  # sampled, not four copies of one answer
    assert all(len(s["diffmas_accounting"]["stability"]) == 4 for s in a)
    conf = first["configs"]["diffmas_gsm8k"]
    assert conf["repeats"] == 4
    assert {k: conf["generation_kwargs"][k] for k in ("do_sample", "temperature", "top_p", "max_gen_toks")} == {
        "do_sample": True, "temperature": 0.6, "top_p": 0.95, "max_gen_toks": 6}
    res = first["results"]["diffmas_gsm8k"]
    for key in ("exact_match,none", "exact_match_stderr,none", "consistent,none", "exact_match,majority",
                *(f"correct_{j}of4,none" for j in range(5))):
        assert key in res
    assert abs(sum(res[f"correct_{j}of4,none"] for j in range(5)) - 1) < 1e-9
    means = first["config"]["stability"]["per_task"]["diffmas_gsm8k"]
    assert means["answers"] == 8 and abs(sum(means["stopped"].values()) - 1) < 1e-9


def test_self_consistency_counts_on_a_constructed_result_set():
    table = consistency_table([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
    assert table["correct_of_k"] == {0: 1, 1: 1, 2: 1, 3: 1, 4: 1}
    assert table["consistent"] == 2 / 5 and abs(table["pass@1"] - 10 / 20) < 1e-12
    # the same through the task's scorer and lm-eval's own filters (take_first_k; extraction, majority_vote)
    doc = {"answer": "42"}
    samples = ["so \\boxed{42}", "#### 42", "the answer is 41", "42."]
    per_q = process_number(doc, [samples])
    assert per_q["exact_match"] == 3 / 4 and per_q["consistent"] == 1 and per_q["correct_3of4"] == 1
    cfg = task_config("diffmas_gsm8k", get_protocol("paper"))
    majority = next(f for f in cfg["filter_list"] if f["name"] == "majority")
    comps = [[f["function"], {k: v for k, v in f.items() if k != "function"}] for f in majority["filter"]]
    ens: FilterEnsemble = build_filter_ensemble("majority", comps)
    voted = list(_apply(ens, [samples, ["41", "\\boxed{7}", "7", "about 41"]], [doc, doc]))
    assert voted == ["\\boxed{42}", "\\boxed{41}"]  # ties go to the earliest answer (Counter order)
    assert process_number(doc, [voted[0]]) == {"exact_match": 1}
    letter_doc = {"answer": "B", "letters": ["A", "B", "C"]}
    assert process_letter(letter_doc, [["(B)", "answer: C", "The answer is B", "B."]])["exact_match"] == 3 / 4


def _apply(ens, resps, docs):
    out = resps
    for f in ens.filters:
        out = list((f if hasattr(f, "apply") else f()).apply(out, docs))  # a built filter, or its constructor
    return out


def test_summary_means_and_curve():
    recs = [AnswerStats([-1.0, -3.0], [2.0, 1.0], "eos").record(), AnswerStats([-2.0], [4.0], "length").record(),
            AnswerStats([], [], "eos").record()]
    s = summarise(recs)
    assert s["answers"] == 3 and s["stopped"] == {"eos": round(2 / 3, 6), "stop": 0.0, "length": round(1 / 3, 6)}
    assert s["mean_logprob"] == -2.0 and s["entropy_curve"] == [3.0, 1.0] and s["entropy_curve_n"] == [2, 1]
    assert abs(s["perplexity"] - (2.718281828 ** 2)) < 1e-5


@pytest.mark.parametrize("call, message", [
    (lambda: get_protocol("paper", samples=0), "samples per question must be an integer >= 1"),
    (lambda: get_protocol("greedy", temperature=0.6), "greedy ignores the temperature"),
    (lambda: get_protocol("paper", top_p=0.0), r"outside \(0, 1\]"),
    (lambda: get_protocol("paper", top_p=1.5), r"outside \(0, 1\]"),
    (lambda: get_protocol("nucleus"), "choose from greedy, paper"),
    (lambda: check_stability_tasks(["diffmas_gsm8k", "diffmas_arc_challenge"]), "diffmas_arc_challenge: no generated"),
    (lambda: task_config("diffmas_arc_challenge", get_protocol("paper")), "generative tasks only"),
])
def test_bad_input_is_refused_before_compute(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_servers_answer_becomes_a_record_without_its_eos_and_without_entropies(tiny_llama):
    """``served_record``: vLLM's sampled-token log-probabilities (logprobs=0) as the sample log's record; the
    EOS token (by its text, or its id with return_tokens_as_token_ids) is not part of the answer."""
    from diffmas_eval.serving import Completion
    from diffmas_eval.stability import served_record

    tok = tiny_llama[1]
    eos = {tok.eos_token_id}
    lps = [-0.1, -0.2, -0.6]
    by_text = served_record(Completion("ab", 3, "stop", lps, ["a", "b", tok.eos_token], None), eos, tok)
    by_id = served_record(Completion("ab", 3, "stop", lps, ["token_id:5", "token_id:6",
                                                             f"token_id:{tok.eos_token_id}"], None), eos, tok)
    assert by_text == by_id and by_text["tokens"] == 2 and by_text["stopped"] == "eos"
    assert abs(by_text["mean_logprob"] + 0.15) < 1e-9 and by_text["mean_entropy"] is None and by_text["entropy"] == []
    stopped = served_record(Completion("ab\n\n", 3, "stop", lps, ["a", "b", "\n\n"], "\n\n"), eos, tok)
    assert (stopped["tokens"], stopped["stopped"]) == (3, "stop")
    capped = served_record(Completion("abc", 3, "length", lps, ["a", "b", "c"], None), eos, tok)
    assert capped["stopped"] == "length" and abs(capped["perplexity"] - 2.718281828 ** 0.3) < 1e-5
    assert served_record(Completion("ab", 2, "stop"), eos, tok) is None  # a server that gave no logprobs
