"""A trained chain is one artifact, loaded one way (``latent.persist.load_trained_chain``) by every front end, and
its final agent reads one prompt (``prompts.final_prompt_ids``), the one SFT trains (issue 30)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffmas_eval.commands.cli import main
from diffmas_eval.latent.persist import (
    CARD_FILE,
    CONFIG_FILE,
    REALIGN_FILE,
    SCHEMA_VERSION,
    load_chain_config,
    load_trained_chain,
)
from tests.test_training import make_trainer

QUESTION = "What is 12 + 30?"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def adapter(tiny_path, tmp_path_factory):
    """A tiny adapter trained (2 steps) through a 2-agent chain with 3 latent steps and a trained realignment:
    none of it the defaults (4 agents, 10 latent steps, the ridge map)."""
    work = tmp_path_factory.mktemp("trained")
    trainer = make_trainer(tiny_path, work, steps=2, roles=["planner", "solver"], latent_steps=3)
    trainer.train()
    out = work / "adapter"
    trainer.save_model(str(out))
    return out


def test_the_saved_folder_is_a_hub_artifact(adapter):
    data = json.loads((adapter / CONFIG_FILE).read_text())
    assert data["schema_version"] == SCHEMA_VERSION and data["diffmas_eval_version"]
    assert (adapter / REALIGN_FILE).exists() and (adapter / "adapter_config.json").exists()
    card = (adapter / CARD_FILE).read_text()
    assert card.startswith("---\n") and "lm_eval --model diffmas" in card and "| latent_steps | 3 |" in card
    assert "planner, solver" in card and "learning_rate" in card
    options, realign = load_chain_config(adapter)  # the version fields are provenance, not options
    assert "schema_version" not in options and realign == adapter / REALIGN_FILE


def test_a_newer_schema_is_refused_with_the_fix(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"roles": ["planner", "solver"], "schema_version": 99,
                                                    "diffmas_eval_version": "9.0"}))
    with pytest.raises(ValueError, match="schema version 99, written by diffmas-eval 9.0.*upgrade"):
        load_chain_config(tmp_path)


def test_ask_peft_runs_the_trained_chain(adapter, tiny_path, capsys):
    import argparse

    from diffmas_eval.commands.cli import add_chain_args, chain_of

    p = argparse.ArgumentParser()
    add_chain_args(p)
    base = ["--model", str(tiny_path), "--peft", str(adapter), "--dtype", "float32", "--device", "cpu"]
    chain = chain_of(p.parse_args(base))
    trained = torch.load(adapter / REALIGN_FILE)
    assert chain.config.roles == ["planner", "solver"] and chain.config.latent_steps == 3
    assert torch.equal(chain.realigner.weight.detach().cpu(), trained)
    assert any("lora" in n for n, _ in chain.model.named_parameters())
    # an explicit flag wins; the trained realignment still applies (same realign mode)
    chain = chain_of(p.parse_args([*base, "--latent-steps", "1"]))
    assert chain.config.latent_steps == 1 and chain.config.roles == ["planner", "solver"]
    assert torch.equal(chain.realigner.weight.detach().cpu(), trained)
    # another realignment mode is not the trained one
    chain = chain_of(p.parse_args([*base, "--realign", "identity"]))
    assert chain.config.realign == "identity" and not torch.equal(chain.realigner.weight.detach().cpu(), trained)
    # the command: one upstream agent with 3 latent steps in its trace table
    assert main(["ask", QUESTION, *base, "--max-new-tokens", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("planner", "critic"))]
    assert [(r[0], r[2]) for r in rows] == [("planner", "3")]


def test_the_probe_loads_the_trained_chain(adapter, tiny_path, tmp_path, monkeypatch):
    from diffmas_eval.latent import chain as chain_module
    from diffmas_eval.leaderboard.ablate import probe
    from diffmas_eval.leaderboard.grid.settings import Settings

    seen = []
    original = chain_module.AgentChain.gradient_probe
    monkeypatch.setattr(chain_module.AgentChain, "gradient_probe",
                        lambda self, *a: seen.append(self) or original(self, *a))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": [{"role": "user", "content": QUESTION}],
                                "completion": [{"role": "assistant", "content": "42"}]}) + "\n")
    settings = Settings(model=str(tiny_path), agents=2, latent_steps=3)
    out = probe(settings, "math", rows, 1, tmp_path / "probes", "cpu", adapter=adapter)
    assert json.loads(out.read_text())["roles"] == ["planner"]
    assert torch.equal(seen[0].realigner.weight.detach().cpu(), torch.load(adapter / REALIGN_FILE))


def test_one_final_prompt_for_the_trainer_lm_eval_ask_and_the_probe(tiny_path, tmp_path):
    from diffmas_eval.harness.diffmas_lm import DiffMASLM
    from diffmas_eval.training.trainer import training_row

    chat = [{"role": "user", "content": QUESTION}]
    trainer = make_trainer(tiny_path, tmp_path, rows=[{"prompt": chat,
                                                       "completion": [{"role": "assistant", "content": "42"}]}],
                           roles=["planner", "critic", "solver"], latent_steps=1)
    row = trainer.train_dataset[0]
    n = next(i for i, x in enumerate(row["labels"]) if x != -100)
    from_trainer = row["input_ids"][:n]  # what TRL tokenized as the final agent's prompt (labels -100)
    lm = DiffMASLM(pretrained=str(tiny_path), agents=3, latent_steps=1, device="cpu", dtype="float32")
    text = lm.apply_chat_template(chat)
    from_lm_eval = lm._final_ids(text, lm.tok_encode(text))
    from_ask = lm.chain.final_prompt(QUESTION)
    ids, labels = training_row(lm.tokenizer, lm.chain.config.upstream, chat,
                               [{"role": "assistant", "content": "42"}])
    from_probe = ids[:next(i for i, x in enumerate(labels) if x != -100)]
    assert from_trainer == from_lm_eval == from_ask == from_probe
    assert (ids, labels) == (row["input_ids"], row["labels"])  # the probe's target is the trainer's too


def _hub_cache(adapter: Path, cache: Path, repo: str = "someone/tiny-diffmas") -> Path:
    """``adapter`` laid out as the Hub cache holds a downloaded repo: models--org--name/snapshots/REV, refs/main."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(adapter, root / "snapshots" / rev)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)
    return root / "snapshots" / rev


def test_a_hub_repo_id_is_a_trained_chain(adapter, tiny_path, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = _hub_cache(adapter, tmp_path / "hub")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    trained = load_trained_chain("someone/tiny-diffmas")
    assert Path(trained.adapter).resolve() == snapshot.resolve() and trained.config.latent_steps == 3
    assert trained.realign is not None and trained.config.roles == ["planner", "solver"]
    from diffmas_eval.harness.diffmas_lm import DiffMASLM

    lm = DiffMASLM(pretrained=str(tiny_path), peft="someone/tiny-diffmas", device="cpu", dtype="float32")
    assert lm.chain.config.latent_steps == 3
    assert torch.equal(lm.chain.realigner.weight.detach().cpu(), torch.load(adapter / REALIGN_FILE))
    with pytest.raises(ValueError, match="neither a local folder nor a Hub repo"):
        load_trained_chain("someone/not-there")


def test_ask_peft_takes_a_hub_repo_id_offline(adapter, tiny_path, tmp_path):
    _hub_cache(adapter, tmp_path / "hub")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "diffmas_eval.commands.cli", "ask", QUESTION, "--model", str(tiny_path),
                          "--peft", "someone/tiny-diffmas", "--dtype", "float32", "--device", "cpu",
                          "--max-new-tokens", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("planner", "critic"))]
    assert [(r[0], r[2]) for r in rows] == [("planner", "3")]


def test_push_to_hub_uploads_the_chain_with_the_adapter(tiny_path, tmp_path, monkeypatch):
    import transformers.trainer as hf_trainer

    uploaded = {}

    class FakeApi:
        def create_repo(self, name, **kw):
            return type("Url", (), {"repo_id": name})()

        def upload_folder(self, folder_path, **kw):
            uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir() if p.is_file()})

    monkeypatch.setattr(hf_trainer, "hf_api", lambda: FakeApi())
    trainer = make_trainer(tiny_path, tmp_path, steps=1, roles=["planner", "solver"], latent_steps=3)
    trainer.args.hub_model_id = "someone/tiny-diffmas"
    trainer.train()
    trainer.push_to_hub()
    assert {CONFIG_FILE, REALIGN_FILE, CARD_FILE, "adapter_config.json"} <= set(uploaded)
    assert json.loads(uploaded[CONFIG_FILE])["latent_steps"] == 3
    card = uploaded[CARD_FILE].decode()
    assert card.count("\n---\n") >= 1 and "peft=someone/tiny-diffmas" in card and card.startswith("---\n")
