"""The real bundled SmolLM2-135M-Instruct, end to end through the user command."""

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_ask_on_bundled_model_prints_answer_and_a_trace_table_that_adds_up():
    out = subprocess.run(
        [sys.executable, "-m", "diffmas_eval.commands.cli", "ask", "What is 12 + 30?", "--agents", "4",
         "--latent-steps", "3", "--max-new-tokens", "24"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    answer, table = out.stdout.split("\n\nagent", 1)
    assert answer.strip()
    rows = [line.split() for line in table.splitlines()[1:] if line and not line.startswith(("trace", "stage"))]
    assert [r[0] for r in rows] == ["planner", "critic", "refiner"]
    assert all(int(r[2]) == 3 and int(r[3]) == int(r[1]) + 3 for r in rows)
    total = next(line.split() for line in table.splitlines() if line.startswith("trace"))
    assert int(total[1]) == sum(int(r[3]) for r in rows)
    assert int(total[2].replace(",", "")) == sum(int(r[4].replace(",", "")) for r in rows)
    # SmolLM2-135M: 30 layers x 3 KV heads x 64 dims x 2 (K,V) x 4 bytes (float32) per position
    assert int(total[2].replace(",", "")) == int(total[1]) * 30 * 3 * 64 * 2 * 4
    assert re.search(r"stage 1: [\d.]+ s\s+stage 2: [\d.]+ s", out.stdout)


def test_bad_option_is_one_clear_line():
    out = subprocess.run([sys.executable, "-m", "diffmas_eval.commands.cli", "ask", "hi", "--model", "bundled:nope"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "unknown bundled model 'nope'; bundled models: smollm2-135m-instruct" in out.stderr
