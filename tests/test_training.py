"""DiffMASSFTTrainer and trainers/sft.py on a tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

from diffmas_eval.latent import LatentConfig
from diffmas_eval.models import prepare_tokenizer
from diffmas_eval.training.trainer import DiffMASSFTTrainer

ROWS = [
    {"prompt": "Question: What is 12 + 30?\nAnswer:", "completion": " 42"},
    {"prompt": "Question: Which animal barks? (A) fox (B) dog\nAnswer:", "completion": " (B) dog"},
    {"prompt": "Question: What is 2 + 3?\nAnswer:", "completion": " 5"},
    {"prompt": [{"role": "user", "content": "The quick brown fox jumps over the lazy what?"}],
     "completion": [{"role": "assistant", "content": "dog"}]},
]
REPO = Path(__file__).resolve().parents[1]


def load(tiny_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_path)
    prepare_tokenizer(tok)
    return model, tok


def make_trainer(tiny_path, tmp_path, rows=None, peft=True, steps=6, **config):
    model, tok = load(tiny_path)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=2,
                     learning_rate=config.pop("lr", 5e-3), logging_steps=1, report_to="none", use_cpu=True,
                     save_strategy="no", seed=0, max_length=config.pop("max_length", 1024), bf16=False,
                     gradient_checkpointing=config.pop("gradient_checkpointing", False))
    train = Dataset.from_list((ROWS[:3] if rows is None else rows) * 4)
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]) if peft else None
    chain = LatentConfig(**{"latent_steps": 2, **config})
    return DiffMASSFTTrainer(model, args=args, diffmas_config=chain, train_dataset=train, processing_class=tok,
                             peft_config=peft_config, trainable_realign=config.get("realign", "ridge") == "ridge"
                             and peft)


@pytest.mark.parametrize("peft", [True, False])
def test_loss_decreases(tiny_path, tmp_path, peft):
    trainer = make_trainer(tiny_path, tmp_path, peft=peft, steps=8, lr=1e-2 if peft else 1e-3)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1


def _lora_grads(trainer):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    trainer.model.zero_grad()
    trainer.compute_loss(trainer.model, batch).backward()
    # lora_B: lora_A gets no gradient while B is still at its zero initialisation
    return torch.cat([p.grad.flatten() for n, p in trainer.model.named_parameters() if "lora_B" in n])


def test_stage1_grad_full_reaches_lora_through_stage1(tiny_path, tmp_path):
    full = _lora_grads(make_trainer(tiny_path, tmp_path, stage1_grad="full"))
    none = _lora_grads(make_trainer(tiny_path, tmp_path, stage1_grad="none"))
    assert full.abs().sum() > 0 and none.abs().sum() > 0
    assert (full - none).abs().max() > 1e-8  # the part of the gradient that crossed the trace


def test_gradient_checkpointing_becomes_per_agent_checkpointing(tiny_path, tmp_path):
    plain = make_trainer(tiny_path, tmp_path)
    ckpt = make_trainer(tiny_path, tmp_path, gradient_checkpointing=True)
    assert ckpt.diffmas_config.checkpoint_agents and not ckpt.args.gradient_checkpointing
    batch = plain.data_collator([plain.train_dataset[i] for i in range(2)])
    plain.model.train()
    ckpt.model.train()
    assert abs(plain.compute_loss(plain.model, batch).item() - ckpt.compute_loss(ckpt.model, batch).item()) < 1e-5
    # switched on by hand at model level, it would cut the trace: refused, not trained silently
    ckpt.model.base_model.model.gradient_checkpointing_enable()
    with pytest.raises(RuntimeError, match="drops the KV cache"):
        ckpt.compute_loss(ckpt.model, batch)


def test_saved_adapter_reproduces_the_chain_in_lm_eval(tiny_path, tmp_path):
    from lm_eval.api.instance import Instance

    from diffmas_eval.harness.diffmas_lm import DiffMASLM

    trainer = make_trainer(tiny_path, tmp_path, steps=3, lr=5e-2)
    trainer.train()
    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    saved = json.loads((out / "diffmas.json").read_text())
    assert saved["latent_steps"] == 2 and saved["trained_realign"] is True
    assert (out / "adapter_model.safetensors").exists() and (out / "diffmas_realign.pt").exists()

    prompt, answer = "Question: What is 12 + 30?\nAnswer:", " 42"
    trainer.model.eval()
    chain = trainer.chain
    with torch.no_grad():
        trace = chain.stage1([prompt])
        note = chain.encode(chain.task_prompt(""))
        expected = chain.loglikelihood(trace, [note + chain.encode(prompt)], [chain.encode(answer)])[0][0]
    lm = DiffMASLM(pretrained=str(tiny_path), peft=str(out), device="cpu", dtype="float32")
    assert lm.chain.config.latent_steps == 2 and lm.chain.config.roles == chain.config.roles
    got = lm.loglikelihood([Instance("loglikelihood", {}, (prompt, answer), 0)], disable_tqdm=True)[0][0]
    assert abs(got - expected) < 1e-4
    base = DiffMASLM(pretrained=str(tiny_path), device="cpu", dtype="float32", latent_steps=2)
    untrained = base.loglikelihood([Instance("loglikelihood", {}, (prompt, answer), 0)], disable_tqdm=True)[0][0]
    assert abs(untrained - expected) > 1e-3  # the adapter and realignment really were loaded


def test_accelerate_launch_trains_and_writes_a_loadable_adapter(tiny_path, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS[:3]) + "\n")  # one shape per file (JSON loader)
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--cpu", "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "trainers/sft.py"),
           "--model_name_or_path", str(tiny_path), "--dataset_name", str(data), "--use_peft", "--agents", "3",
           "--latent_steps", "2", "--max_steps", "3", "--per_device_train_batch_size", "2", "--report_to", "none",
           "--output_dir", str(out), "--logging_steps", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from peft import PeftModel

    adapter = PeftModel.from_pretrained(load(tiny_path)[0], out)
    assert adapter.peft_config["default"].r == 8  # the DiffMAS default rank
    assert json.loads((out / "diffmas.json").read_text())["roles"] == ["planner", "critic", "solver"]


def test_bad_rows_fail_clearly(tiny_path, tmp_path):
    with pytest.raises(ValueError, match="needs prompt/completion rows"):
        make_trainer(tiny_path, tmp_path, rows=[{"text": "hello"}])
    with pytest.raises(ValueError, match="row 1: empty completion"):
        make_trainer(tiny_path, tmp_path, rows=[ROWS[0], {"prompt": "Question: x", "completion": ""}])
    long_row = {"prompt": "Question: " + "word " * 400, "completion": " 1"}
    with pytest.raises(ValueError, match=r"row 0: the prompt has \d+ tokens .* but max_length=64"):
        make_trainer(tiny_path, tmp_path, rows=[long_row], max_length=64)


def test_upstream_agents_see_the_prompt_only(tiny_path, tmp_path):
    trainer = make_trainer(tiny_path, tmp_path, rows=ROWS[:3])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert batch["diffmas_question"] == [r["prompt"] for r in ROWS[:3]]
    chat = [ROWS[3], {"prompt": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "What is 2 + 3?"}],
                      "completion": [{"role": "assistant", "content": "5"}]}]
    trainer = make_trainer(tiny_path, tmp_path, rows=chat)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert batch["diffmas_question"] == [ROWS[3]["prompt"][0]["content"], "What is 2 + 3?"]
    # the final agent's prompt carries the trace note inside the user turn, as lm-eval's diffmas builds it
    assert trainer.train_dataset[1]["prompt"][1]["content"].startswith("[Latent thoughts from the planner")


@pytest.mark.parametrize("layout", [{"trace": "stitch"}, {"topology": "hierarchical",
                                                          "roles": ["math", "science", "code", "summarizer"]}])
def test_training_through_independent_segments(tiny_path, tmp_path, layout):
    """StitchMAS and the hierarchical chain train like the sequential one: the loss falls, LoRA learns."""
    trainer = make_trainer(tiny_path, tmp_path, steps=8, lr=1e-2, **layout)
    assert trainer.diffmas_config.independent
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1


def test_offloaded_weights_are_refused_before_any_compute(tiny_path, tmp_path):
    """A device_map that offloads a layer (``disk`` here; ``cpu`` beside GPUs offloads too) leaves its weights on
    meta: the step would fail in backward ("expected device meta"), so the trainer refuses the model up front."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_path, dtype=torch.float32, offload_folder=str(tmp_path / "offload"),
        device_map={"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                    "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"})
    assert any(p.device.type == "meta" for p in model.parameters())
    tok = AutoTokenizer.from_pretrained(tiny_path)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to="none", use_cpu=True, bf16=False)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"offloaded .*first: model\.layers\.1\..*'model\.layers\.1': 'disk'.*"
                                         r"--load_in_4bit"):
        DiffMASSFTTrainer(model, args=args, diffmas_config=LatentConfig(latent_steps=1),
                          train_dataset=Dataset.from_list(ROWS[:3]), processing_class=tok,
                          peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert not calls
