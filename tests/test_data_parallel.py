"""``accelerate launch -m lm_eval --model diffmas|textmas``: requests split across processes, same results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
TASKS = ["diffmas_arc_challenge", "diffmas_gsm8k"]  # loglikelihood (shared traces) and generate_until


def _run(launcher: list[str], model_args: str, out: Path, data_dir: Path,
         model: str = "diffmas") -> subprocess.CompletedProcess:
    # 3 docs on 2 ranks: rank 1 gets lm-eval's padding copies, which must change nothing
    cmd = [*launcher, "--model", model, "--model_args", model_args, "--tasks", ",".join(TASKS),
           "--limit", "3", "--gen_kwargs", "max_gen_toks=6", "--log_samples", "--output_path", str(out)]
    # accelerate 1.x: `--cpu --num_processes 2` starts ONE process (multi-CPU wants mpirun); its torchrun
    # launcher (--multi_gpu) with ACCELERATE_USE_CPU starts two on gloo
    env = {**os.environ, "DIFFMAS_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _samples(out: Path, task: str) -> list[dict]:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(rows, key=lambda r: (r["doc_id"], r["filter"]))


@pytest.mark.parametrize("model", ["diffmas", "textmas"])
def test_two_processes_give_the_single_process_samples(tiny_path, local_data, tmp_path, model):
    args = f"pretrained={tiny_path},agents=2,dtype=float32," + (
        "latent_steps=1" if model == "diffmas" else "agent_max_tokens=4")
    _run([str(BIN / "lm_eval")], args, tmp_path / "one", local_data, model)
    two = _run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lm_eval"], args, tmp_path / "two",
               local_data, model)
    # the requests really were split: rank 0 built contexts for 2 of the 3 docs (rank 1 logs nothing)
    assert "100%|██████████| 2/2" in two.stderr and "3/3" not in two.stderr
    for task in TASKS:
        one, dp = _samples(tmp_path / "one", task), _samples(tmp_path / "two", task)
        assert [r["doc_id"] for r in dp] == [0, 1, 2]
        for a, b in zip(one, dp):
            # lm-eval appends its padding copies' answers to the padded request's resps: compare the first
            assert [r[0] for r in a["resps"]] == [r[0] for r in b["resps"]]
            assert a["filtered_resps"] == b["filtered_resps"]
            assert a["doc_hash"] == b["doc_hash"] and a["prompt_hash"] == b["prompt_hash"]
            # every sample carries its accounting, including those scored on rank 1
            assert b["diffmas_accounting"]["doc_id"] == b["doc_id"]
    (result,) = (tmp_path / "two").rglob("results_*.json")
    (single,) = (tmp_path / "one").rglob("results_*.json")
    result, single = json.loads(result.read_text()), json.loads(single.read_text())
    assert result["results"] == single["results"]
    accounting = result["config"]["accounting"]
    assert accounting["samples"] == 6  # 3 per task, padding copies not counted twice
    assert {t: v["samples"] for t, v in accounting["per_task"].items()} == dict.fromkeys(TASKS, 3)
