"""The presets reach lm-eval (read back from the results JSON) and the trainer (its own argument parser),
and bad protocol input is refused before any compute."""

import json
import time

import pytest

from diffmas_eval.commands.cli import main
from diffmas_eval.leaderboard.grid.settings import Settings, short_hash
from diffmas_eval.leaderboard.grid.trainings import sft_set
from diffmas_eval.leaderboard.runner.score import score_lm_eval
from diffmas_eval.leaderboard.runner.train import TRAINER, launch_command, train_adapter
from diffmas_eval.tasks.protocol import PAPER_CAPS


def test_paper_protocol_reaches_lm_eval_and_the_config_hash(tiny_path, local_data, tmp_path):
    paper = Settings(model=str(tiny_path), limit=1, max_gen_toks=4, protocol="paper")
    greedy = Settings(model=str(tiny_path), limit=1, max_gen_toks=4)
    assert short_hash(paper.cell("single", "diffmas_gsm8k")) != short_hash(greedy.cell("single", "diffmas_gsm8k"))
    assert "protocol" not in greedy.cell("single", "diffmas_gsm8k")  # greedy cells keep their earlier hashes
    path = score_lm_eval(paper, "single", "diffmas_gsm8k", None, tmp_path / "runs", tmp_path / "cache", 2, "cpu")
    results = json.loads(path.read_text())
    task = results["configs"]["diffmas_gsm8k"]
    assert task["repeats"] == 4
    assert {k: task["generation_kwargs"][k] for k in ("do_sample", "temperature", "top_p", "max_gen_toks")} == {
        "do_sample": True, "temperature": 0.6, "top_p": 0.95, "max_gen_toks": 4}
    assert results["leaderboard"]["config"]["protocol"]["name"] == "paper"
    assert "consistent,none" in results["results"]["diffmas_gsm8k"]
    assert results["config"]["stability"]["per_task"]["diffmas_gsm8k"]["answers"] == 4
    # without --max-gen-toks each task takes the protocol's cap
    assert Settings(protocol="paper").answer_cap("diffmas_aime24") == PAPER_CAPS["diffmas_aime24"] == 20000
    assert Settings().answer_cap("diffmas_aime24") == 96


def _sft_parser():
    from diffmas_eval.training.sft import parser

    return parser()  # the trainer's own: what `accelerate launch -m diffmas_eval.training.sft` parses


def test_paper_recipe_reaches_the_trainer(tmp_path):
    spec = Settings(recipe="paper", train_batch_size=2).training("diffmas", "code")
    cmd = launch_command(spec, tmp_path / "code.jsonl", tmp_path / "out", None, cuda=False)
    argv = cmd[cmd.index(TRAINER) + 1:]
    # `accelerate launch --cpu` tells the trainer it runs on a CPU; parsing alone needs it said
    script, args, model, dm = _sft_parser().parse_args_and_config([*argv, "--use_cpu", "true"])
    assert (args.learning_rate, args.lr_scheduler_type.value, args.gradient_accumulation_steps) == (5e-5, "cosine", 32)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 64
    assert args.num_train_epochs == 10 and args.max_steps == -1 and args.optim.value == "adamw_torch"
    assert (model.lora_r, model.lora_alpha, model.use_peft) == (8, 16, True)
    offline = Settings().training("diffmas", "code")
    assert "recipe" not in offline  # the offline adapters keep their hashes
    assert short_hash(offline) != short_hash(spec)


@pytest.mark.parametrize("extra, message", [
    (["--samples", "0"], "samples per question must be an integer >= 1"),
    (["--temperature", "0.6"], "greedy ignores the temperature"),
    (["--protocol", "paper", "--top-p", "1.5"], r"outside \(0, 1\]"),
    (["--stability", "diffmas_arc_challenge"], "diffmas_arc_challenge: no generated output"),
    (["--limit", "5,diffmas_aime24=3"], "not in --tasks"),
])
def test_leaderboard_refuses_bad_protocol_input_before_compute(tmp_path, capsys, extra, message):
    import re

    t0 = time.perf_counter()
    code = main(["leaderboard", "--tasks", "diffmas_gsm8k,diffmas_arc_challenge", "--methods", "single",
                 "--output", str(tmp_path / "lb.csv"), *extra])
    assert code == 2 and re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "runs").exists() and time.perf_counter() - t0 < 60


def test_unknown_preset_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        main(["leaderboard", "--protocol", "nucleus"])
    assert "choose from 'greedy', 'paper'" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["diffmas", "textmas"])
@pytest.mark.parametrize("gen, message", [
    ({"do_sample": False, "temperature": 0.6}, "greedy decoding ignores the temperature"),
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.0}, r"outside \(0, 1\]"),
])
def test_models_refuse_a_temperature_with_greedy_decoding_before_decoding(tiny_path, monkeypatch, model, gen, message):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from diffmas_eval.latent import AgentChain

    lm = get_model(model).create_from_arg_string(f"pretrained={tiny_path},agents=2", {"device": "cpu"})
    monkeypatch.setattr(AgentChain, "stage1", lambda *a, **k: pytest.fail("compute before the check"))
    if model == "textmas":
        monkeypatch.setattr(lm.chain, "run", lambda *a, **k: pytest.fail("compute before the check"))
    ok = Instance("generate_until", {}, ("Question: 1+1?\nAnswer:", {"until": ["\n"], "max_gen_toks": 2}), 0)
    bad = Instance("generate_until", {}, ("Question: 2+2?\nAnswer:", {"until": ["\n"], **gen}), 1)
    with pytest.raises(ValueError, match=message):
        lm.generate_until([ok, bad], disable_tqdm=True)


def test_shipped_paper_yamls_match_the_protocol_and_run_in_lm_eval(tiny_path, local_data):
    from lm_eval import simple_evaluate

    from diffmas_eval.harness.plugin import TASKS_DIR
    from diffmas_eval.tasks.protocol import SAMPLED_TASKS, paper_yaml

    for task in SAMPLED_TASKS:  # regenerate: python -c "...paper_yaml(t)" into tasks/<t>_paper.yaml
        assert (TASKS_DIR / f"{task}_paper.yaml").read_text() == paper_yaml(task), task
    out = simple_evaluate(model="diffmas", model_args=f"pretrained={tiny_path},agents=1", tasks=["diffmas_gsm8k_paper"],
                          limit=1, gen_kwargs={"max_gen_toks": 3}, device="cpu", batch_size=4)
    res = out["results"]["diffmas_gsm8k_paper"]
    assert out["configs"]["diffmas_gsm8k_paper"]["repeats"] == 4
    assert {"exact_match,none", "exact_match,majority", "consistent,none", "correct_4of4,none"} <= set(res)


def test_paper_recipe_read_back_from_the_trained_adapters_diffmas_json(tiny_path, data_dir, tmp_path):
    """--recipe paper, trained for real (`accelerate launch -m diffmas_eval.training.sft` on the tiny model, the
    paper's code set: the last HumanEval problems): diffmas.json records the recipe as it ran."""
    settings = Settings(model=str(tiny_path), recipe="paper", agents=2, latent_steps=1, train_max_length=2048,
                        sft_examples={"code": 4})
    data, bounds, used = sft_set("code", 4, tmp_path / "work", str(data_dir), "paper")
    settings.sft_sources["code"] = used
    assert used.startswith("paper") and bounds == {"humanevalplus": 160}
    out = train_adapter(settings, "diffmas", "code", data, tmp_path / "work", cuda=False, threads=1)
    saved = json.loads((out / "diffmas.json").read_text())
    t = saved["training"]
    assert (t["learning_rate"], t["lr_scheduler_type"], t["optim"]) == (5e-5, "cosine", "adamw_torch")
    assert t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] * t["world_size"] == 64
    assert (t["num_train_epochs"], t["max_steps"], t["lora_r"], t["lora_alpha"]) == (10, -1, 8, 16)
    assert t["global_step"] == 10  # 4 rows, accumulation to 64: one optimizer step per epoch
    assert saved["latent_steps"] == 1 and len(saved["roles"]) == 2
