"""Trained methods are trained in the format they are scored in (issue 34, item 1).

For one item of a multiple-choice task, the final agent's prompt tokens as TRL builds them from the SFT row
(through ``DiffMASSFTTrainer``) equal the context tokens lm-eval scores it on (through the leaderboard's own
model and ``model_args``), for ``single-sft`` and ``diffmas``, with and without the chat template.
"""

import json

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.registry import get_model
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

from diffmas_eval.leaderboard.grid import trainings as train
from diffmas_eval.leaderboard.grid.settings import Settings, method_model_args
from diffmas_eval.models import prepare_tokenizer
from diffmas_eval.tasks import utils
from diffmas_eval.training.data import choice_row
from diffmas_eval.training.sft import DiffMASArguments, load_data
from diffmas_eval.training.trainer import QUESTION, DiffMASSFTTrainer

TASK = "diffmas_commonsense_qa"


def _trained(settings: Settings, method: str, row: dict, tmp_path, model_path) -> tuple[dict, str]:
    """The row as the trainer tokenizes it (the leaderboard's own conversion), and an adapter for scoring."""
    spec = settings.training(method, "commonsense")
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps(row) + "\n")
    if spec.get("sft_format") == "chat":
        data = train.chat_set(data)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_path)
    prepare_tokenizer(tok)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to="none", use_cpu=True, bf16=False,
                     max_length=spec["max_length"], seed=spec["seed"])
    trainer = DiffMASSFTTrainer(model, args=args, train_dataset=load_data(str(data), None)["train"],
                                diffmas_config=DiffMASArguments(agents=spec["agents"],
                                                                latent_steps=spec["latent_steps"]).to_config(),
                                processing_class=tok, peft_config=LoraConfig(r=8, target_modules=["q_proj"]))
    trainer.save_model(str(tmp_path / "adapter"))  # untrained: scoring only needs it to load
    return trainer.train_dataset[0], str(tmp_path / "adapter")


def _scored(settings: Settings, method: str, adapter: str, monkeypatch) -> list[tuple[str, list[int], list[int]]]:
    """(question, final agent's context ids, continuation ids) per choice of the task's first item, as scored."""
    name, model_args = method_model_args(method, settings.model, settings.agents, settings.latent_steps,
                                         adapter=adapter)
    lm = get_model(name).create_from_arg_string(model_args + ",dtype=float32")
    seen: list[tuple[str, list[int], list[int]]] = []
    if name == "diffmas":
        def score(items, *a, **k):
            seen.extend(items)
            return [(0.0, False)] * len(items)
        monkeypatch.setattr(lm, "_score", score)
    else:  # textmas at agents=1: lm-eval's hf scores the final agent's context
        def tokens(requests, *a, **k):
            seen.extend(("", list(c), list(x)) for _, c, x in requests)
            return [(0.0, False)] * len(requests)
        monkeypatch.setattr(lm.final_hflm, "_loglikelihood_tokens", tokens)
    simple_evaluate(model=lm, tasks=[TASK], limit=1, apply_chat_template=settings.chat_template, device="cpu")
    return seen


@pytest.mark.parametrize("model", ["tiny", "bundled"])
@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("method", ["single-sft", "diffmas"])
def test_training_prompt_ids_equal_the_scored_context_ids(method, chat, model, request, local_data, tmp_path,
                                                          monkeypatch):
    """On a tiny model's template and on the bundled SmolLM2's (the leaderboard's default: a default system turn)."""
    path = request.getfixturevalue("tiny_path" if model == "tiny" else "bundled_path")
    settings = Settings(model=str(path), chat_template=chat, agents=2, latent_steps=1)
    assert ("sft_format" in settings.training(method, "commonsense")) == chat
    doc = utils.load_commonsense_qa()["test"][0]
    row, adapter = _trained(settings, method, choice_row(doc), tmp_path, path)
    first = next(i for i, x in enumerate(row["labels"]) if x != -100)  # TRL's completion mask, folded into labels
    prompt, completion = row["input_ids"][:first], row["input_ids"][first:]

    scored = _scored(settings, method, adapter, monkeypatch)
    assert len(scored) == len(doc["choices"])
    # the final agent reads the same token ids before the answer, the note on the trace included. lm-eval moves a
    # context's trailing whitespace into the continuation (HFLM._encode_pair): with the chat template the generation
    # prompt's last "\n" is scored as the first continuation token, the same for every choice (acc is unchanged)
    moved = len(prompt) - len(scored[0][1])
    assert moved == (1 if chat else 0)
    for _, ctx, cont in scored:
        assert ctx == prompt[:len(prompt) - moved] and (ctx + cont)[:len(prompt)] == prompt
    gold = scored[doc["label"]][2]
    # the gold choice's tokens start the completion; after them only the end of the answer (EOS plain, the end of
    # the turn chat), which scoring never reads
    assert prompt + completion[:len(gold) - moved] == scored[doc["label"]][1] + gold
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.decode(completion[len(gold) - moved:]).strip() in (tok.eos_token, "<|im_end|>")
    if method == "diffmas":  # the upstream agents read the same question in training and at scoring
        assert {q for q, _, _ in scored} == {row[QUESTION]}


@pytest.mark.parametrize("chat", [False, True])
def test_single_sft_and_diffmas_train_on_the_same_data_steps_batch_and_seed(chat):
    settings = Settings(chat_template=chat, agents=3)
    for family in ("math", "commonsense", "code"):
        single, diffmas = settings.training("single-sft", family), settings.training("diffmas", family)
        assert (single["agents"], diffmas["agents"]) == (1, 3)
        chain = {"agents", "latent_steps"}  # what differs: the chain, not the data or the optimisation
        assert {k: v for k, v in single.items() if k not in chain} == {k: v for k, v in diffmas.items()
                                                                       if k not in chain}
        assert single.get("sft_format", "plain") == ("chat" if chat and family != "code" else "plain")


def test_the_commonsense_family_trains_on_its_budget_and_the_others_keep_their_adapters():
    """The offline budget moves only the family it names: its adapters (single-sft and diffmas alike) train
    steps x batch of ``OFFLINE_BUDGETS``; math and code adapters are the ones ``--train-steps`` x
    ``--train-batch-size`` make, key for key (so their hashes, and cached adapters, are unchanged)."""
    from diffmas_eval.leaderboard.grid.settings import OFFLINE_BUDGETS

    steps, batch = OFFLINE_BUDGETS["commonsense"]
    settings, flat = Settings(), Settings(train_budgets={})
    for method in ("single-sft", "diffmas"):
        spec = settings.training(method, "commonsense")
        assert (spec["steps"], spec["batch_size"]) == (steps, batch) != (flat.train_steps, flat.train_batch_size)
        for family in ("math", "code"):
            assert settings.training(method, family) == flat.training(method, family)
        assert settings.cell(method, "diffmas_gsm8k") == flat.cell(method, "diffmas_gsm8k")
        assert settings.cell(method, "diffmas_arc_challenge") != flat.cell(method, "diffmas_arc_challenge")
    paper = Settings(recipe="paper").training("diffmas", "commonsense")  # the paper recipe: epochs, accumulation
    assert paper["steps"] is None and paper["batch_size"] * paper["accumulation"] == 64


def test_the_saved_adapter_keeps_its_loss_curve(tiny_path, tmp_path):
    """Item 2's record: the loss per logged step in ``loss.csv``, its first and last in ``diffmas.json``."""
    import csv

    from tests.test_training import make_trainer

    trainer = make_trainer(tiny_path, tmp_path, steps=3)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    with open(tmp_path / "adapter" / "loss.csv", newline="") as f:
        curve = list(csv.DictReader(f))
    assert [int(r["step"]) for r in curve] == [1, 2, 3]
    record = json.loads((tmp_path / "adapter" / "diffmas.json").read_text())["training"]
    assert (record["loss_first"], record["loss_last"], record["loss_steps"]) == (
        float(curve[0]["loss"]), float(curve[-1]["loss"]), 3)


def _write_chat_many(source: str, out: str, times: int) -> None:
    from pathlib import Path

    from diffmas_eval.training.data import write_chat

    for _ in range(times):
        write_chat(Path(source), Path(out))


def test_two_training_jobs_write_the_chat_set_at_once(tmp_path):
    """Two trainings of a family (``make ablations``, ``JOBS=2``) both write its chat rows; with one shared
    temporary file, one job's rename moved it away under the other (FileNotFoundError: the miniature ablation
    failed that way in CI). Two real processes, many writes each: none fails, and the file is whole."""
    import multiprocessing

    from diffmas_eval.training.data import to_chat

    rows = [{"prompt": f"Question: q{i}?\nAnswer:", "completion": f" a{i}"} for i in range(200)]
    source, out = tmp_path / "commonsense.jsonl", tmp_path / "commonsense-chat.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ctx = multiprocessing.get_context("spawn")
    jobs = [ctx.Process(target=_write_chat_many, args=(str(source), str(out), 300)) for _ in range(2)]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join(120)
    assert [j.exitcode for j in jobs] == [0, 0]
    assert [json.loads(line) for line in out.read_text().splitlines()] == [to_chat(r) for r in rows]
    assert not list(tmp_path.glob("*.tmp"))
