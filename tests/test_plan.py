"""``--plan`` and the placement flags without a Ray: the per-token time estimate from an earlier run's cells, the
memory refusal, and one definition of the flags for ``leaderboard`` and ``ablate``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from diffmas_eval.commands.cli import build_parser
from diffmas_eval.leaderboard.grid.plan import JobPlan, cell_seconds, check_fit, token_budget
from diffmas_eval.leaderboard.grid.settings import Settings
from diffmas_eval.leaderboard.runner.placement import FIELDS, GIB, Placement, resources_of
from diffmas_eval.leaderboard.runner.scheduler import largest_gpu


def earlier_cell(runs: Path, method: str, task: str, seconds: float, tokens: float) -> None:
    path = runs / method / f"results_{task}_0123456789.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"leaderboard": {"seconds_per_sample": seconds, "tokens_per_sample": tokens}}))


def test_time_is_per_generated_token_so_it_carries_over_to_another_cap(tmp_path):
    # an earlier greedy cell: 2 s per sample for 40 generated tokens = 0.05 s per token
    earlier_cell(tmp_path, "single", "diffmas_gsm8k", 2.0, 40.0)
    short = Settings(limit=10, max_gen_toks=100)
    assert cell_seconds(short, "single", "diffmas_gsm8k", tmp_path) == pytest.approx(0.05 * 10 * 100)
    # the paper's protocol: 4 samples per question at the given cap; the rate is the same, the tokens are not
    paper = Settings(limit=10, max_gen_toks=2000, protocol="paper")
    assert cell_seconds(paper, "single", "diffmas_gsm8k", tmp_path) == pytest.approx(0.05 * 10 * 4 * 2000)
    # the text MAS generates its upstream notes too
    earlier_cell(tmp_path, "textmas", "diffmas_gsm8k", 6.0, 120.0)
    text = Settings(limit=10, max_gen_toks=100, agents=3, agent_max_tokens=50)
    assert token_budget(text, "textmas", "diffmas_gsm8k") == 100 + 2 * 50
    assert cell_seconds(text, "textmas", "diffmas_gsm8k", tmp_path) == pytest.approx(0.05 * 10 * 200)


def test_a_task_that_generates_nothing_is_timed_per_item_and_no_earlier_cell_gives_no_time(tmp_path):
    earlier_cell(tmp_path, "single", "diffmas_arc_challenge", 0.5, 0.0)
    assert cell_seconds(Settings(limit=30), "single", "diffmas_arc_challenge", tmp_path) == pytest.approx(15.0)
    assert cell_seconds(Settings(limit=30), "diffmas", "diffmas_arc_challenge", tmp_path) is None
    assert cell_seconds(Settings(limit=0), "single", "diffmas_arc_challenge", tmp_path) is None  # every item


def test_a_job_too_large_for_the_largest_gpu_is_refused_with_the_numbers():
    given = largest_gpu([], given=int(0.5 * GIB))  # --gpu-memory 0.5: no node is asked
    assert given == ("GPU of --gpu-memory", GIB // 2)
    fits = JobPlan("single x gsm8k", "cell", 1, 1, weights=GIB // 4, cache=GIB // 8)
    big = JobPlan("train diffmas (math)", "train", 1, 1, weights=GIB // 2, cache=GIB // 4)
    check_fit([fits], given)
    with pytest.raises(ValueError, match=r"train diffmas \(math\): needs about 768.0 MiB of accelerator memory "
                                         r"\(weights 512.0 MiB \+ cache 256.0 MiB\), more than the largest GPU has "
                                         r"\(GPU of --gpu-memory, 512.0 MiB\)"):
        check_fit([fits, big], given)
    check_fit([JobPlan("spread", "cell", 2, 1, weights=GIB // 2, cache=GIB // 4)], given)  # over 2 GPUs: fits
    check_fit([JobPlan("on the CPU", "cell", 0, 1, weights=GIB, cache=GIB)], given)  # asks for no GPU
    with pytest.raises(ValueError, match="--gpu-memory must be > 0 GiB, got -1"):
        resources_of(Placement(gpu_memory=-1), Path("out/x.csv"), Path("out/cache"))


def test_a_job_is_compared_with_its_share_of_a_gpu_less_the_servers():
    """Two cells at --gpus-per-cell 0.5 share one GPU's memory, and a vLLM server beside the jobs holds its
    --gpu-memory-utilization of it: a cell that fits a whole GPU alone is refused at half of one, or beside the
    server."""
    from diffmas_eval.leaderboard.runner.serve import SHARED_GPU_MEMORY, gpu_share

    gpu = ("H100", GIB)
    cell = JobPlan("diffmas x gsm8k", "cell", 1, 1, weights=GIB // 2, cache=GIB // 8)  # 640 MiB
    check_fit([cell], gpu)
    with pytest.raises(ValueError, match=r"diffmas x gsm8k: needs about 640.0 MiB .*more than the largest GPU has "
                                         r"\(H100, 1.0 GiB\) for it \(0.5 of it: 512.0 MiB\)"):
        check_fit([JobPlan("diffmas x gsm8k", "cell", 0.5, 1, weights=GIB // 2, cache=GIB // 8)], gpu)
    with pytest.raises(ValueError, match=r"\(1 of them less the vLLM server's 45%: 563.2 MiB\); .*a GPU of its own"):
        check_fit([cell], gpu, SHARED_GPU_MEMORY)
    check_fit([JobPlan("small", "cell", 0.5, 1, weights=GIB // 8, cache=GIB // 8)], gpu, SHARED_GPU_MEMORY)
    args = ["--dtype", "bfloat16"]
    assert gpu_share(args, ["0"]) == SHARED_GPU_MEMORY  # one GPU: the server shares it with the jobs
    assert gpu_share([*args, "--gpu-memory-utilization=0.3"], ["0"]) == 0.3
    assert gpu_share(args, ["0", "1"]) == 0.0  # a GPU of its own (serve.split_gpus)
    assert gpu_share(["--tensor-parallel-size", "2"], ["0", "1"]) == SHARED_GPU_MEMORY
    assert gpu_share(args, []) == 0.0  # a CPU


def _placement_actions(command: str) -> dict:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    return {a.dest: (tuple(a.option_strings), a.default, a.type, a.help) for a in parser._actions
            if a.dest in FIELDS}


def test_leaderboard_and_ablate_share_one_definition_of_the_placement_flags():
    ours, theirs = _placement_actions("leaderboard"), _placement_actions("ablate")
    assert set(ours) == set(FIELDS) and ours == theirs
    args = build_parser().parse_args(["ablate", "--gpus-per-cell", "0.5", "--gpus-per-training", "2",
                                      "--ray-address", "127.0.0.1:6379", "--gpu-memory", "80", "--plan"])
    assert (args.gpus_per_cell, args.gpus_per_training, args.ray_address, args.gpu_memory, args.plan) == (
        0.5, 2, "127.0.0.1:6379", 80.0, True)
