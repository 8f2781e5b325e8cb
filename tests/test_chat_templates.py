"""Every chat template: role instructions reach each agent whether or not the template takes a system message."""

import pytest
import torch

from diffmas_eval.latent import AgentChain, LatentConfig
from diffmas_eval.prompts import ROLES, chat_format, final_preamble, takes_system
from diffmas_eval.testing.tiny import TEMPLATES, make_tiny_model, save_tiny_model
from diffmas_eval.textmas.chain import TextChain
from tests.conftest import QUESTIONS

KINDS = list(TEMPLATES)  # system (taken), no_system (refused, Gemma), alternating (Mistral v0.1/v0.2)


@pytest.fixture(scope="module", params=KINDS)
def templated(request):
    return request.param, *make_tiny_model("llama", template=request.param)


def test_the_probe_sees_which_templates_take_a_system_message(templated):
    kind, _, tok = templated
    assert takes_system(tok) == (kind == "system")


def test_diffmas_agents_get_their_instructions_exactly_once(templated):
    kind, model, tok = templated
    chain = AgentChain(model, tok, LatentConfig.from_dict({"agents": 4, "latent_steps": 2}))
    for role, rows in zip(chain.config.upstream, chain.upstream_prompts(QUESTIONS[:2])):
        for question, ids in zip(QUESTIONS[:2], rows):
            text = tok.decode(ids)
            assert text.count(ROLES[role].instruction) == 1 and text.count(question) == 1
    final = [chain.final_prompt(q) for q in QUESTIONS[:2]]
    # the final agent's prompt is the one SFT trains (issue 30): the trace note and the question once each, in the
    # template's user turn, and no role instruction (the trainer never gave the final agent one)
    text = tok.decode(final[0])
    assert text.count(final_preamble(chain.config.upstream)) == 1 and text.count(QUESTIONS[0]) == 1
    assert ROLES["solver"].instruction not in text
    with torch.no_grad():
        trace = chain.stage1(QUESTIONS[:2])
        gens = chain.generate(trace, final, max_new_tokens=4)
        scores = chain.loglikelihood(trace, final, [chain.encode(" 42")] * 2)
    assert len(gens) == 2 and all(s < 0 for s, _ in scores)


def test_textmas_agents_get_their_instructions_exactly_once(templated):
    kind, model, tok = templated
    chain = TextChain(backend=None, tokenizer=tok, roles=["planner", "critic", "solver"])
    text = chain.prompt("critic", QUESTIONS[0], [("planner", "Add the numbers.")])
    assert text.count(ROLES["critic"].instruction) == 1 and "Add the numbers." in text


def test_a_template_with_a_system_role_renders_exactly_as_before():
    _, tok = make_tiny_model("llama", template="system")
    system, user = ROLES["planner"].instruction, QUESTIONS[0]
    direct = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                     tokenize=False, add_generation_prompt=True)
    assert chat_format(tok, system, user) == direct


def test_the_decision_is_made_once_per_template(monkeypatch):
    _, tok = make_tiny_model("llama", template="no_system")
    takes_system(tok)
    calls = []
    render = tok.apply_chat_template
    monkeypatch.setattr(tok, "apply_chat_template", lambda *a, **k: calls.append(1) or render(*a, **k))
    for _ in range(3):
        chat_format(tok, "Be brief.", "What is 2+2?")
    assert len(calls) == 3  # one render per prompt, no probing or retrying


@pytest.mark.parametrize("kind", ["no_system", "alternating"])
def test_lm_eval_runs_diffmas_and_textmas_on_templates_without_a_system_role(kind, tmp_path, local_data):
    from lm_eval import simple_evaluate

    path = save_tiny_model(tmp_path / kind, template=kind)
    tasks = ["diffmas_arc_challenge", "diffmas_gsm8k"]
    runs = {}
    for model, args in [("hf", ""), ("diffmas", ",agents=1"), ("diffmas", ",agents=3,latent_steps=1"),
                        ("textmas", ",agents=3,agent_max_tokens=4")]:
        runs[model + args] = simple_evaluate(model=model, model_args=f"pretrained={path},dtype=float32{args}",
                                             tasks=tasks, limit=2, apply_chat_template=True, log_samples=True,
                                             gen_kwargs={"max_gen_toks": 4}, device="cpu", batch_size=2)
    for task in tasks:  # agents=1 is still lm-eval's hf, request for request
        hf, one = (sorted(runs[k]["samples"][task], key=lambda s: s["doc_id"]) for k in ("hf", "diffmas,agents=1"))
        for h, d in zip(hf, one, strict=True):
            assert h["arguments"] == d["arguments"]
            if task == "diffmas_gsm8k":
                assert h["resps"] == d["resps"]
            else:
                for (lh, gh), (ld, gd) in zip([r[0] for r in h["resps"]], [r[0] for r in d["resps"]]):
                    assert abs(lh - ld) < 1e-4 and gh == gd
        for run in runs.values():
            assert len(run["samples"][task]) == 2
