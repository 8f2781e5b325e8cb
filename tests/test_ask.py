"""``diffmas-eval ask`` as functions: ``build_chain`` + ``ask`` return what the command prints."""

import re

import diffmas_eval.ask as ask_module
from diffmas_eval.ask import Answer, ask, build_chain, format_trace_table
from diffmas_eval.commands import cli
from diffmas_eval.commands.cli import main
from diffmas_eval.latent import AgentChain, LatentConfig, persist
from diffmas_eval.latent.persist import load_trained_chain

QUESTION = "What is 12 + 30?"


def test_ask_returns_the_answer_and_its_trace(tiny_llama):
    model, tok = tiny_llama
    chain = AgentChain(model, tok, LatentConfig.from_dict({"agents": 3, "latent_steps": 2}))
    answer = ask(chain, QUESTION, max_new_tokens=5)
    assert isinstance(answer, Answer) and answer.question == QUESTION
    assert len(answer.token_ids) <= 5 and answer.text == tok.decode(answer.token_ids, skip_special_tokens=True)
    rows = answer.trace.table()
    assert [r["agent"] for r in rows] == ["planner", "critic"] and all(r["latent"] == 2 for r in rows)
    assert answer.trace.length == sum(r["positions"] for r in rows)
    assert answer.stage1_seconds > 0 and answer.stage2_seconds > 0
    again = ask(chain, QUESTION, max_new_tokens=5)  # one loaded chain serves many questions, greedily
    assert again.token_ids == answer.token_ids


def test_the_command_prints_what_the_functions_return(tiny_path, capsys, monkeypatch):
    config = LatentConfig.from_dict({"agents": 2, "latent_steps": 3})
    answer = ask(build_chain(str(tiny_path), config, dtype="float32", device="cpu", seed=1), QUESTION, 4)
    loads = []  # the command loads the trained chain (diffmas.json, the realignment, a Hub download) once

    def counted(*args, **kwargs):
        loads.append(args)
        return load_trained_chain(*args, **kwargs)

    monkeypatch.setattr(persist, "load_trained_chain", counted)
    monkeypatch.setattr(ask_module, "load_trained_chain", counted)
    monkeypatch.setattr(cli, "load_trained_chain", counted)
    assert main(["ask", QUESTION, "--model", str(tiny_path), "--agents", "2", "--latent-steps", "3",
                 "--max-new-tokens", "4", "--dtype", "float32", "--device", "cpu", "--seed", "1"]) == 0
    assert len(loads) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{answer.text.strip()}\n\n{format_trace_table(answer.trace)}\n\nstage 1: ")
    assert re.search(rf"stage 1: [\d.]+ s   stage 2: [\d.]+ s \({len(answer.token_ids)} tokens\)\n$", out)
