"""Each decision is made by one function that every path calls (issue 30): roles, trace length, dtypes, tasks,
how an answer ended."""

import subprocess
import sys

import pytest
import torch

from diffmas_eval.prompts import resolve_roles, topology_roles


def test_one_role_resolution(tmp_path):
    assert resolve_roles()[1] == ["planner", "critic", "refiner", "solver"]
    assert resolve_roles(agents=2)[1] == ["planner", "solver"]
    assert resolve_roles(order=["planner", "solver"])[1] == ["planner", "solver"]  # a trained chain's roles
    assert resolve_roles(agents=3, saved_topology="hierarchical")[1] == topology_roles(3, "hierarchical")
    assert resolve_roles(topology="hierarchical", order=["planner", "critic", "solver"])[1] == ["math", "science",
                                                                                                 "summarizer"]
    roles = tmp_path / "roles.yaml"
    roles.write_text("scout: Look around.\njudge: Decide.\n")
    role_map, order = resolve_roles(roles_file=str(roles))
    assert order == ["scout", "judge"] and role_map["judge"].instruction == "Decide."
    with pytest.raises(ValueError, match="agents=3 but the roles file"):
        resolve_roles(roles_file=str(roles), agents=3)


def test_one_trace_length():
    from diffmas_eval.latent.chain import TraceTooLongError, check_budget
    from diffmas_eval.latent.config import LatentConfig
    from diffmas_eval.memory import trace_memory, trace_positions

    assert trace_positions([5, 7], 3) == 18 and trace_positions([5, 7], 3, independent=True) == 10
    config = LatentConfig.from_dict({"agents": 3, "latent_steps": 3, "max_trace_tokens": 17})
    with pytest.raises(TraceTooLongError, match="needs 18 positions"):
        check_budget(config, [[5], [7]], None, None)
    from transformers import LlamaConfig

    small = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=64)
    assert trace_memory("x", 3, 3, [5, 7], dtype="float32", config=small).trace_positions == 18


def test_one_dtype_table():
    from diffmas_eval import memory, models

    assert models.torch_dtype("bfloat16") is torch.bfloat16 and models.torch_dtype("auto", models.LOAD_DTYPES) == "auto"
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; choose one of float32, bfloat16, float16, auto"):
        models.load_model("unused", dtype="fp8")
    with pytest.raises(ValueError, match="choose one of bfloat16, float16, float32"):
        memory.trace_memory("x", dtype="float64")
    assert not hasattr(memory, "DTYPES")


def test_one_task_registry():
    from diffmas_eval.leaderboard.grid import settings as config
    from diffmas_eval.tasks import protocol, registry

    assert config.TASKS == registry.DEFAULT_TASKS and config.CODE_TASKS is registry.CODE_TASKS
    assert protocol.SAMPLED_TASKS is registry.SAMPLED_TASKS and list(protocol.CODE_TASKS) == ["humanevalplus",
                                                                                              "mbppplus"]
    assert registry.of_kind("multiple_choice") == ["diffmas_arc_challenge", "diffmas_commonsense_qa"]
    run = [sys.executable, "-m", "diffmas_eval.tasks.registry"]
    out = subprocess.run([*run, "multiple_choice", "diffmas_gsm8k,diffmas_arc_challenge"], capture_output=True,
                         text=True, check=True).stdout
    assert out == "diffmas_arc_challenge\n"
    out = subprocess.run([*run, "default"], capture_output=True, text=True, check=True).stdout
    assert out.strip().split(",") == list(registry.DEFAULT_TASKS)


def test_one_answer_ending():
    from diffmas_eval.harness.textmas_lm import _answer_stats
    from diffmas_eval.stability import server_stats
    from diffmas_eval.stopping import ending, stop_hit

    assert (ending(True, True), ending(False, True), ending(False, False)) == ("eos", "stop", "length")
    assert stop_hit("a\n\nb", ["", "\n\n"]) and not stop_hit("ab", ["\n\n"])
    decode = lambda ids: "".join(map(str, ids))  # noqa: E731
    assert _answer_stats([1, 2, 9], [0.0] * 3, [0.0] * 3, 5, {9}, [], decode).stopped == "eos"
    assert _answer_stats([1, 2], [0.0] * 2, [0.0] * 2, 2, {9}, ["2"], decode).stopped == "stop"
    assert _answer_stats([1, 2], [0.0] * 2, [0.0] * 2, 2, {9}, [], decode).stopped == "length"
    assert server_stats([0.0], [True], "stop", "\n\n").stopped == "stop"
    assert server_stats([0.0], [True], "stop", None).stopped == "eos"
    assert server_stats([0.0], [True], "length", None).stopped == "length"
