"""Supervised fine-tuning of a DiffMAS chain, in the style of TRL's example scripts: the package's entry point.

    accelerate launch -m diffmas_eval.training.sft \
        --model_name_or_path Qwen/Qwen3-8B --dataset_name data/math_sft.jsonl \
        --use_peft --lora_r 8 --agents 4 --latent_steps 10 --output_dir out/
    accelerate launch trainers/sft.py ...      # the same, from a checkout (a thin file over this module)
    diffmas-sft ...                            # the same, one process, no accelerate launcher

    # CPU, offline, the bundled model:
    accelerate launch --cpu -m diffmas_eval.training.sft --model_name_or_path bundled:smollm2-135m-instruct \
        --dataset_name data/commonsense_sft.jsonl --use_peft --max_steps 100 --output_dir out/

Every SFTConfig/ModelConfig/ScriptArguments option works as in TRL (``--help`` lists them); the
DiffMAS options are below. ``--dataset_name`` is a hub id or a local .json/.jsonl file with
``prompt`` and ``completion`` (strings or chat messages). The output directory holds the adapter
(or model) and ``diffmas.json``, so ``lm_eval --model diffmas --model_args pretrained=...,peft=out/``
rebuilds the trained chain. It lives in the package so that an installed wheel trains too (the
leaderboard launches this module, not a file of the checkout).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser, get_peft_config

from ..latent import LatentConfig
from ..models import prepare_tokenizer, resolve_pretrained
from .trainer import DiffMASSFTTrainer


@dataclass
class DiffMASArguments:
    agents: int = field(default=4, metadata={"help": "agents, final agent included"})
    latent_steps: int = field(default=10, metadata={"help": "latent thoughts per upstream agent"})
    realign: str = field(default="ridge", metadata={"help": "ridge | identity | none"})
    trace: str = field(default="concat", metadata={"help": "concat | overwrite | stitch (segments built apart)"})
    topology: str = field(default="sequential", metadata={"help": "sequential | hierarchical (domain agents + "
                                                                  "summarizer)"})
    stage1_grad: str = field(default="full", metadata={"help": "full | none (no gradient through stage 1)"})
    train_realign: bool = field(default=False, metadata={"help": "train the realignment W_a too"})
    max_trace_tokens: int | None = field(default=None, metadata={"help": "refuse longer latent traces"})


def load_data(name: str, config: str | None):
    if name.endswith((".json", ".jsonl")):
        return load_dataset("json", data_files=name)
    return load_dataset(name, config)


def main(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelConfig,
         dm_args: DiffMASArguments) -> None:
    path = resolve_pretrained(model_args.model_name_or_path)
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", revision=model_args.model_revision,
                                                 attn_implementation=model_args.attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision)
    prepare_tokenizer(tokenizer)
    chain = LatentConfig.from_dict({"agents": dm_args.agents, "latent_steps": dm_args.latent_steps,
                                    "realign": dm_args.realign, "trace": dm_args.trace, "topology": dm_args.topology,
                                    "stage1_grad": dm_args.stage1_grad, "max_trace_tokens": dm_args.max_trace_tokens})
    dataset = load_data(script_args.dataset_name, script_args.dataset_config)
    test_split = script_args.dataset_test_split
    trainer = DiffMASSFTTrainer(
        model, args=training_args, diffmas_config=chain, trainable_realign=dm_args.train_realign,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[test_split] if training_args.eval_strategy != "no" and test_split in dataset else None,
        processing_class=tokenizer, peft_config=get_peft_config(model_args))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)


def parser() -> TrlParser:
    p = TrlParser((ScriptArguments, SFTConfig, ModelConfig, DiffMASArguments))
    p.set_defaults(lora_r=8, lora_alpha=16)  # DiffMAS default: rank-8 LoRA shared by all roles
    if not torch.cuda.is_available():  # TRL defaults to bf16, which refuses to start on a CPU-only machine
        p.set_defaults(bf16=False, use_cpu=True)
    return p


def cli(argv: list[str] | None = None) -> None:
    main(*parser().parse_args_and_config(argv))


if __name__ == "__main__":
    cli()
