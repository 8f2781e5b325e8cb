"""The leaderboard end to end on a tiny model (training, lm-eval, EvalPlus), and the collector on its files."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest

from diffmas_eval.commands.cli import main
from diffmas_eval.leaderboard.grid.trainings import check_disjoint
from diffmas_eval.leaderboard.results.collect import collect
from diffmas_eval.leaderboard.results.sections import README_END, README_START, update_readme

TASKS = "diffmas_arc_challenge,humanevalplus"
METHODS = "single,diffmas"


def mini_args(model: Path, out: Path) -> list[str]:
    return ["leaderboard", "--model", str(model), "--methods", METHODS, "--tasks", TASKS, "--limit", "2",
            "--agents", "2", "--latent-steps", "2", "--max-gen-toks", "8", "--train-steps", "2",
            "--train-batch-size", "1", "--train-max-length", "2048", "--sft-examples", "commonsense=4,code=4",
            "--batch-size", "2", "--threads", "1", "--output", str(out / "leaderboard.csv")]


@pytest.fixture(scope="module")
def mini(tiny_path, data_dir, tmp_path_factory):
    """A miniature `make leaderboard`: 2 items, two tasks, two methods, 2 training steps per adapter."""
    import torch

    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFMAS_DATA_DIR", str(data_dir))
    mp.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", ""))  # --threads sets it; restored after
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("leaderboard")
    assert main(mini_args(tiny_path, out)) == 0
    yield out
    torch.set_num_threads(threads)
    mp.undo()


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_miniature_leaderboard_writes_csv_table_and_charts(mini):
    rows = read_rows(mini / "leaderboard.csv")
    cells = {(r["method"], r["task"], r["metric"]) for r in rows}
    assert cells == {(m, t, k) for m in ("single", "diffmas") for t, ks in
                     (("diffmas_arc_challenge", ("acc", "acc_norm")), ("humanevalplus", ("pass@1", "pass@1_base")))
                     for k in ks}
    assert {r["n"] for r in rows} == {"2"}
    diffmas = [r for r in rows if r["method"] == "diffmas"]
    assert all(r["adapter"] and Path(r["adapter"], "diffmas.json").exists() for r in diffmas)  # trained, then scored
    assert {r["agents"] for r in diffmas} == {"2"} and {r["latent_steps"] for r in diffmas} == {"2"}
    for r in rows:  # the lm-eval numbers are the results JSON's own
        if r["task"] == "diffmas_arc_challenge":
            res = json.loads(Path(r["source"]).read_text())["results"]["diffmas_arc_challenge"]
            assert float(r["value"]) == pytest.approx(res[f"{r['metric']},none"], abs=1e-4)
        else:  # EvalPlus's pass@1, as diffmas-eval codegen reports it
            summary = json.loads(Path(r["source"]).with_name("summary.json").read_text())["pass@1"]
            assert float(r["value"]) == pytest.approx(summary["plus" if r["metric"] == "pass@1" else "base"])
    table = (mini / "leaderboard.md").read_text()
    assert "| single |" in table and "| diffmas |" in table and "humanevalplus (pass@1)" in table
    assert "latent_steps=2" in table  # the budgets are stated above the table
    # one paired comparison per task: diffmas against single over the 2 items both scored, in the table too
    paired = read_rows(mini / "comparisons.csv")
    assert {(r["task"], r["method"], r["reference"], r["items"]) for r in paired} == {
        (t, "diffmas", "single", "2") for t in ("diffmas_arc_challenge", "humanevalplus")}
    assert "| humanevalplus | pass@1 | diffmas | single | 2 |" in table
    # the adapters record their training: the loss curve and its ends (issue 34)
    for r in diffmas:
        marker = json.loads(Path(r["adapter"], "leaderboard-adapter.json").read_text())
        assert marker["loss"]["steps"] == 2 and Path(r["adapter"], "loss.csv").exists()
    # ... and the leaderboard keeps that record beside its CSV, where the adapters (outside git) are not needed
    trained = read_rows(mini / "training.csv")
    assert [(r["method"], r["family"], r["steps"], r["batch_size"]) for r in trained] == [
        ("diffmas", f, "2", "1") for f in ("code", "commonsense")]
    curves = read_rows(mini / "training_loss.csv")
    for r in trained:
        mine = [float(c["loss"]) for c in curves if c["adapter"] == r["adapter"]]
        assert len(mine) == 2 and (mine[0], mine[-1]) == pytest.approx((float(r["loss_first"]), float(r["loss_last"])))
    # the multiple-choice results first, with intervals; the code task as a labelled pipeline check
    mc, pipeline = table.index("**Multiple choice** (the first 2 items"), table.index("**Pipeline check**")
    assert mc < pipeline and "diffmas_arc_challenge (acc)" in table[mc:pipeline]
    assert "humanevalplus (pass@1)" in table[pipeline:] and "| `diffmas` | code (plain rows) | 2 x 2 | 2 x 1 |" in table
    for chart in ("accuracy.png", "accuracy_vs_tokens.png", "differences.png", "training_loss.png"):
        assert (mini / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_item_scores_outlive_the_cells(mini, tmp_path):
    """leaderboard_items.csv: every cell's score on every item, averaging to the headline value; collected again from
    the cells' files, the same bytes (so the committed file is what the committed cells said)."""
    headline = ("acc", "pass@1")
    rows = {(r["method"], r["task"]): r for r in read_rows(mini / "leaderboard.csv") if r["metric"] in headline}
    items = read_rows(mini / "leaderboard_items.csv")
    assert {(r["method"], r["task"], r["metric"]) for r in items} == {(m, t, r["metric"]) for (m, t), r in rows.items()}
    for (method, task), row in rows.items():
        scores = [float(r["score"]) for r in items if (r["method"], r["task"]) == (method, task)]
        assert len(scores) == 2 and sum(scores) / 2 == pytest.approx(float(row["value"]), abs=1e-4)
        assert {r["config_hash"] for r in items if (r["method"], r["task"]) == (method, task)} == {row["config_hash"]}
    assert [r["doc_id"] for r in items if r["task"] == "humanevalplus"][:2] == ["HumanEval/0", "HumanEval/1"]
    again = tmp_path / "again" / "leaderboard.csv"
    assert main(["leaderboard", "--from-results", str(mini / "runs"), "--output", str(again)]) == 0
    assert (again.parent / "leaderboard_items.csv").read_bytes() == (mini / "leaderboard_items.csv").read_bytes()
    assert again.read_bytes() == (mini / "leaderboard.csv").read_bytes()


def test_rerun_reuses_every_finished_cell_and_adapter(mini, tiny_path, capsys):
    before = {p: p.stat().st_mtime_ns for p in (mini / "runs").rglob("*.json")}
    assert main(mini_args(tiny_path, mini)) == 0
    printed = capsys.readouterr().out
    assert "): training" not in printed and printed.count(": done (") == 4
    assert {p: p.stat().st_mtime_ns for p in (mini / "runs").rglob("*.json")} == before


def _foreign(mini: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The mini's files as if made elsewhere: lm-eval's JSON without our metadata; EvalPlus's file alone."""
    (lm,) = (mini / "runs" / "diffmas").glob("results_*.json")
    data = json.loads(lm.read_text())
    del data["leaderboard"]
    lm_copy = tmp_path / "cluster" / "results_2026.json"
    lm_copy.parent.mkdir()
    lm_copy.write_text(json.dumps(data))
    (ep,) = (mini / "runs" / "evalplus").rglob("single-*/samples_eval_results.json")
    ep_copy = tmp_path / "cluster" / "humaneval_eval_results.json"
    shutil.copy(ep, ep_copy)
    return lm_copy, ep_copy


def test_collector_reads_results_made_anywhere(mini, tmp_path):
    lm, ep = _foreign(mini, tmp_path)
    ours = {(r["method"], r["task"], r["metric"]): r for r in read_rows(mini / "leaderboard.csv")}
    rows = collect([str(lm), f"single={ep}"])
    got = {(r["method"], r["task"], r["metric"]): r for r in rows}
    # the method comes from the model it names (diffmas with peft= is the trained chain)
    assert set(got) == {("diffmas", "diffmas_arc_challenge", "acc"), ("diffmas", "diffmas_arc_challenge", "acc_norm"),
                        ("single", "humanevalplus", "pass@1"), ("single", "humanevalplus", "pass@1_base")}
    for key, row in got.items():
        assert float(row["value"]) == float(ours[key]["value"]) and int(row["n"]) == 2
        assert float(row["stderr"] or 0) == pytest.approx(float(ours[key]["stderr"] or 0))
    with pytest.raises(ValueError, match="METHOD="):  # an EvalPlus file alone does not say whose it is
        collect([str(ep)])


def test_duplicates_and_malformed_files(mini, tmp_path, capsys):
    lm, _ = _foreign(mini, tmp_path)
    own = mini / "runs"
    same = collect([str(own), str(lm)])  # the same numbers twice: kept once
    assert len(same) == len(read_rows(mini / "leaderboard.csv"))
    data = json.loads(lm.read_text())
    data["results"]["diffmas_arc_challenge"]["acc,none"] += 0.5
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="two results for .*diffmas / diffmas_arc_challenge / acc") as err:
        collect([str(own), str(other)])
    assert str(other) in str(err.value) and "runs/diffmas/results_diffmas_arc_challenge" in str(err.value)

    bad = tmp_path / "bad" / "results_bad.json"
    bad.parent.mkdir()
    bad.write_text('{"results": {"diffmas_arc_challenge": ')
    with pytest.raises(ValueError, match=f"{bad}: not valid JSON.*--skip-bad"):
        collect([str(own), str(bad.parent)])
    assert len(collect([str(own), str(bad)], skip_bad=True)) == len(same)
    assert "skipping" in capsys.readouterr().err
    # the command line: one clear line, exit 2
    assert main(["leaderboard", "--from-results", str(bad), "--output", str(tmp_path / "x.csv")]) == 2
    assert str(bad) in capsys.readouterr().err
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"eval": {"HumanEval/0": [{"solution": "x"}]}}))
    with pytest.raises(ValueError, match=f"{wrong}: EvalPlus results without base/plus status"):
        collect([f"single={wrong}"])


def test_readme_section_round_trips(mini, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n\n{README_START}\nold table\n{README_END}\n\nafter\n")
    from diffmas_eval.leaderboard.results import compare
    from diffmas_eval.leaderboard.results import training_records as adapters

    rows = read_rows(mini / "leaderboard.csv")
    paired = compare.comparisons(compare.read_items(mini))  # what --readme adds, from leaderboard_items.csv
    trained = adapters.read(mini)[0]  # ... and the adapters' record, from training.csv
    assert update_readme(readme, rows, comparison_rows=paired, training_rows=trained) is True
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n\n") and text.endswith(f"{README_END}\n\nafter\n")
    assert "old table" not in text and "| diffmas |" in text and "leaderboards/accuracy.png" in text
    assert "| diffmas_arc_challenge | acc | diffmas | single | 2 |" in text  # the paired comparison, per task
    assert "Training budget (LoRA steps x batch): 2 x 1 (code, commonsense)." in text
    assert update_readme(readme, rows, comparison_rows=paired, training_rows=trained) is False
    assert readme.read_text() == text
    assert main(["leaderboard", "--readme", str(readme), "--output", str(mini / "leaderboard.csv")]) == 0
    assert readme.read_text() == text
    (tmp_path / "plain.md").write_text("no markers")
    with pytest.raises(ValueError, match="no leaderboard markers"):
        update_readme(tmp_path / "plain.md", rows)


def test_trained_methods_never_score_their_training_items():
    bounds = {"diffmas_arc_challenge": 822, "diffmas_commonsense_qa": 871}
    check_disjoint("commonsense", bounds, ["diffmas_arc_challenge", "math500"], 822)
    with pytest.raises(ValueError, match="diffmas_arc_challenge: .* at most its first 822 items.*--limit <= 822"):
        check_disjoint("commonsense", bounds, ["diffmas_arc_challenge"], 823)
    with pytest.raises(ValueError, match="--limit is all"):
        check_disjoint("commonsense", bounds, ["diffmas_commonsense_qa"], 0)


def test_interrupted_training_restarts_cleanly_and_a_finished_adapter_is_reused(mini, tiny_path, data_dir, capsys):
    from diffmas_eval.leaderboard.grid import trainings
    from diffmas_eval.leaderboard.grid.settings import Settings
    from diffmas_eval.leaderboard.runner.train import train_adapter

    settings = Settings(model=str(tiny_path), agents=2, latent_steps=2, train_steps=2, train_batch_size=1,
                        train_budgets={}, train_max_length=2048, sft_examples={"commonsense": 4})
    work = mini / "cache"
    data, _, _ = trainings.sft_set("commonsense", 4, work, str(data_dir))
    out = train_adapter(settings, "diffmas", "commonsense", data, work, cuda=False)
    assert "reusing" in capsys.readouterr().out  # the mini leaderboard trained exactly this one
    (out / trainings.MARKER).unlink()  # as if killed after a checkpoint that cannot be read
    (out / "checkpoint-1").mkdir()
    (out / "checkpoint-1" / "trainer_state.json").write_text("{not json")
    assert not trainings.finished(out, out.name.rsplit("-", 1)[1])
    again = train_adapter(settings, "diffmas", "commonsense", data, work, cuda=False)
    printed = capsys.readouterr().out
    assert again == out and "resuming from checkpoint-1" in printed and "restarting" in printed
    assert trainings.finished(out, out.name.rsplit("-", 1)[1]) and not list(out.glob("checkpoint-*"))


def test_jobs_run_cells_side_by_side_with_the_same_numbers(mini, tiny_path, tmp_path, capsys):
    """``--jobs 2``: the same adapters (byte for byte) and numbers as the sequential run, each job logged."""
    out = tmp_path / "parallel"
    assert main([*mini_args(tiny_path, out), "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("[queued ") == 6 and printed.count("[done ") == 6  # 2 adapters, 4 cells, on Ray
    ours = {(r["method"], r["task"], r["metric"]): r["value"] for r in read_rows(mini / "leaderboard.csv")}
    assert {(r["method"], r["task"], r["metric"]): r["value"] for r in read_rows(out / "leaderboard.csv")} == ours
    for adapter in (mini / "cache" / "adapters").glob("*/adapter_model.safetensors"):
        twin = out / "cache" / "adapters" / adapter.parent.name / adapter.name
        assert twin.read_bytes() == adapter.read_bytes()
    logs = list((out / "cache" / "logs").glob("*.log"))
    assert len(logs) == 6 and all(log.stat().st_size > 0 for log in logs)  # each job's output, subprocesses' too
    assert "lm_eval --model" not in printed  # lm-eval's own lines are in the cells' logs
    assert all("lm_eval --model" in log.read_text() for log in logs if "diffmas_arc_challenge" in log.name)


def test_a_failing_job_names_itself_and_its_log(tiny_path, tmp_path, capsys):
    args = ["leaderboard", "--model", str(tiny_path), "--methods", "single", "--tasks", "no_such_task",
            "--limit", "1", "--jobs", "2", "--threads", "1", "--output", str(tmp_path / "leaderboard.csv")]
    with pytest.raises(RuntimeError, match=r"single x no_such_task failed .*its log: .*single-no_such_task-"):
        main(args)
    assert "no_such_task" in capsys.readouterr().out  # the log's tail, printed
    assert main([*args, "--jobs", "0"]) == 2
    assert "--jobs must be >= 1, got 0" in capsys.readouterr().err


def test_ablation_methods_train_and_score_their_own_layout(tiny_path, data_dir, tmp_path, monkeypatch):
    """stitchmas (trained, trace=stitch), latentmas-hier (untrained, topology=hierarchical) and textmas-sft (the
    final text agent trained over the untrained agents' notes) as leaderboard methods: the layout reaches the
    trainer (diffmas.json), lm-eval's model_args and the collector; the notes are what textmas writes."""
    import torch

    from diffmas_eval.leaderboard.grid.settings import Settings

    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(data_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", ""))
    threads = torch.get_num_threads()
    out = tmp_path / "leaderboard.csv"
    try:
        assert main(["leaderboard", "--model", str(tiny_path), "--methods", "stitchmas,latentmas-hier,textmas-sft",
                     "--agent-max-tokens", "4", "--tasks",
                     "diffmas_arc_challenge", "--limit", "2", "--agents", "3", "--latent-steps", "2",
                     "--train-steps", "1", "--train-max-length", "2048", "--sft-examples", "commonsense=4",
                     "--batch-size", "2", "--threads", "1", "--output", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = [r for r in read_rows(out) if r["metric"] == "acc"]
    assert sorted(r["method"] for r in rows) == ["latentmas-hier", "stitchmas", "textmas-sft"]
    for r in rows:
        results = json.loads(Path(r["source"]).read_text())
        model_args = results["config"]["model_args"]
        layout = {"stitchmas": "trace=stitch", "latentmas-hier": "topology=hierarchical",
                  "textmas-sft": "agents=3,agent_max_tokens=4"}[r["method"]]
        assert layout in model_args and ("peft=" in model_args) == (r["method"] != "latentmas-hier")
        del results["leaderboard"]  # as if made elsewhere: the method comes from the model_args
        foreign = tmp_path / f"foreign-{r['method']}.json"
        foreign.write_text(json.dumps(results))
        assert {x["method"] for x in collect([str(foreign)])} == {r["method"]}
    (stitched,) = [r for r in rows if r["method"] == "stitchmas"]
    assert json.loads(Path(stitched["adapter"], "diffmas.json").read_text())["trace"] == "stitch"
    (text,) = [r for r in rows if r["method"] == "textmas-sft"]
    marker = json.loads(Path(text["adapter"], "leaderboard-adapter.json").read_text())
    trained_on = [json.loads(line) for line in Path(marker["data"]).read_text().splitlines()]
    assert "notes" in marker["data"] and len(trained_on) == 4 and marker["training"]["agents"] == 1
    # chat rows (the cells are scored with the chat template): the notes open the user turn, as textmas puts them
    assert marker["training"]["sft_format"] == "chat" and marker["loss"]["steps"] == 1
    assert all(r["prompt"][-1]["content"].startswith("[Notes from the planner, critic agent(s) follow.")
               for r in trained_on)
    assert "trace" not in Settings().cell("diffmas", "diffmas_gsm8k")  # the sequential methods keep their hashes
    assert Settings().cell("stitchmas", "diffmas_gsm8k")["training"]["trace"] == "stitch"


def test_results_put_the_multiple_choice_tasks_first_with_their_intervals():
    """The headline's order (issue 34): accuracy with its 95% interval on the multiple-choice tasks, their paired
    differences, then the generative tasks as a pipeline check that says it cannot rank the methods."""
    from diffmas_eval.leaderboard.results.markdown import headline

    def row(method, task, metric, value, stderr, n):
        return {"model": "m", "method": method, "task": task, "metric": metric, "value": value, "stderr": stderr,
                "n": n, "tokens_per_sample": 30, "seconds_per_sample": 1.0, "agents": 1, "latent_steps": 0,
                "max_gen_toks": 8, "adapter": ""}

    rows = [row(m, "diffmas_commonsense_qa", "acc", v, 0.04, 150) for m, v in (("single", 0.3), ("diffmas", 0.95))]
    rows += [row(m, "diffmas_gsm8k", "exact_match", 0.0, 0.0, 5) for m in ("single", "diffmas")]
    paired = [{"task": "diffmas_commonsense_qa", "metric": "acc", "method": "diffmas", "reference": "single",
               "items": 150, "delta": 0.65, "ci_low": 0.55, "ci_high": 0.75, "beyond_noise": True,
               "beyond_noise_bonferroni": True, "comparisons": 1}]
    text = headline(rows, "charts/", paired)
    mc, pipeline = text.index("**Multiple choice** (the first 150 items"), text.index("**Pipeline check**")
    pair = "| diffmas_commonsense_qa | acc | diffmas | single | 150 | +0.65 | [+0.55, +0.75] |"
    assert mc < text.index(pair) < pipeline
    # 0.3 ± 1.96 x 0.04, and 0.95 + 0.078 clipped at 1
    assert "| single | 0.30 [0.22, 0.38] |" in text and "| diffmas | 0.95 [0.87, 1.00] |" in text
    assert "the first 5 items of each" in text[pipeline:] and "cannot rank the methods" in text[pipeline:]
    assert "diffmas_gsm8k" not in text[mc:pipeline] and "diffmas_commonsense_qa (acc)" not in text[pipeline:]
    assert "![accuracy](charts/accuracy.png) ![differences](charts/differences.png)" in text


def test_the_four_charts_from_rows_with_stability_metrics(tmp_path):
    """accuracy, accuracy vs tokens, entropy along the answer and perplexity vs accuracy, from constructed rows
    (the mini leaderboard has no generative lm-eval task); each a PNG, the stability ones only with their data."""
    from diffmas_eval.leaderboard.results.charts import charts
    from diffmas_eval.leaderboard.results.tables import write_curves

    def row(method, task, metric, value, stderr=0.05):
        return {"model": "m", "method": method, "task": task, "metric": metric, "value": value, "stderr": stderr,
                "n": 20, "tokens_per_sample": 30}

    rows = [row(m, t, k, v) for m in ("single", "diffmas", "stitchmas") for t in ("diffmas_gsm8k", "math500")
            for k, v in (("exact_match", 0.3), ("answer_perplexity", 1.5))]
    assert [p.name for p in charts(rows[::2], tmp_path / "plain")] == ["accuracy.png", "accuracy_vs_tokens.png"]
    write_curves([{"method": m, "task": "diffmas_gsm8k", "position": i, "entropy": 1.0 / (i + 1), "n": 3}
                  for m in ("single", "diffmas") for i in range(5)], tmp_path / "all" / "entropy_curve.csv")
    paths = charts(rows, tmp_path / "all")
    assert [p.name for p in paths] == ["accuracy.png", "accuracy_vs_tokens.png", "entropy_curve.png",
                                       "perplexity_vs_accuracy.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
