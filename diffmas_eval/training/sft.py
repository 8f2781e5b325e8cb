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
DiffMAS options are ``DiffMASArguments``. ``--dataset_name`` is a hub id or a local .json/.jsonl file with
``prompt`` and ``completion`` (strings or chat messages). The output directory holds the adapter
(or model) and ``diffmas.json``, so ``lm_eval --model diffmas --model_args pretrained=...,peft=out/``
rebuilds the trained chain. The DiffMAS flags are generated from the chain's option schema
(``latent.config.chain_options``), the one place their types, defaults, choices and help are written.
It lives in the package so that an installed wheel trains too (the leaderboard launches this module,
not a file of the checkout).
"""

from __future__ import annotations

import os
import signal
from dataclasses import field, make_dataclass

import torch
from accelerate import PartialState
from datasets import load_dataset
from peft import prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser, get_peft_config

from ..latent.config import LatentConfig, chain_options
from ..models import bnb_config, prepare_tokenizer, require_bitsandbytes, resolve_pretrained
from .lifetime import die_with_parent
from .trainer import DiffMASSFTTrainer

TRAIN_REALIGN_HELP = "train the realignment W_a too"


def diffmas_arguments(config_class: type[LatentConfig] = LatentConfig) -> type:
    """TRL's dataclass of the DiffMAS flags (``--agents --latent_steps ...``): one field per chain option
    offered to SFT (``latent.config.chain_options``: type, default, help and choices, which TrlParser passes
    to argparse from the field metadata), then ``train_realign``, a training-only switch that is not part of
    the chain. Built from the schema so a new chain option is a flag here without being restated;
    ``config_class``: a ``LatentConfig`` subclass whose extra options become flags too."""
    schema = chain_options(config_class, front="sft")
    fields = []
    for o in schema:
        metadata = {"help": o.help} | ({"choices": list(o.choices)} if o.choices else {})
        fields.append((o.name, o.annotation, field(default=o.default, metadata=metadata)))
    fields.append(("train_realign", bool, field(default=False, metadata={"help": TRAIN_REALIGN_HELP})))

    def to_config(self) -> LatentConfig:
        """The chain these flags describe (checked: a bad choice fails with the valid ones)."""
        return config_class.from_dict({o.name: getattr(self, o.name) for o in schema})

    return make_dataclass("DiffMASArguments", fields, namespace={"to_config": to_config, "__module__": __name__})


DiffMASArguments = diffmas_arguments()


def load_data(name: str, config: str | None):
    if name.endswith((".json", ".jsonl")):
        return load_dataset("json", data_files=name)
    return load_dataset(name, config)


def kbit_device_map() -> dict[str, int | str]:
    """Where a quantized model goes: all of it on this process's device (what TRL's scripts did with
    ``get_kbit_device_map``). Never ``auto``: under DDP every rank would split the model over all GPUs."""
    if torch.cuda.is_available():
        return {"": PartialState().local_process_index}
    return {"": "cpu"}


def restore_compute_dtype(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast the frozen float32 weights of ``model`` to ``dtype`` (the quantization's compute dtype); return how many.

    PEFT's ``prepare_model_for_kbit_training`` casts every non-quantized weight (embeddings, ``lm_head``, norms) to
    float32, and bitsandbytes' linears return their input's dtype, so the whole residual stream and the latent
    trace became float32: twice the trace and activation memory, and a chain that believes the model is float32.
    TRL's own SFTTrainer (1.x) no longer calls it and keeps a quantized model in its compute dtype; this puts the
    frozen weights back after preparation. Trainable parameters (none yet: the adapter comes after)
    and quantized storage (integer dtypes) are left alone."""
    if dtype == torch.float32:
        return 0
    cast = 0
    for param in model.parameters():
        if param.dtype == torch.float32 and not param.requires_grad:
            param.data = param.data.to(dtype)
            cast += 1
    return cast


def load_training_model(model_args: ModelConfig, training_args: SFTConfig):
    """The model TRL's own ``sft.py`` would build from ``ModelConfig``: dtype, revision, attention, remote code,
    and 4-/8-bit loading (``get_quantization_config``) on this process's device, prepared for k-bit training as
    PEFT requires. ``use_gradient_checkpointing=False``: the chain checkpoints per agent
    (``gradient_checkpointing`` becomes ``checkpoint_agents``) and refuses model-level checkpointing, which
    turns the cache, and with it the trace, off. After preparation the frozen non-quantized weights go back to the
    compute dtype (``restore_compute_dtype``). Bad combinations fail here, before any weight is read."""
    path = resolve_pretrained(model_args.model_name_or_path)
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    trust = bool(getattr(training_args, "trust_remote_code", False) or getattr(model_args, "trust_remote_code", False))
    # TRL's get_quantization_config, except that dtype auto/None gives a compute dtype, not an error
    default = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    compute = dtype if isinstance(dtype, torch.dtype) else default
    quantization = bnb_config(model_args.load_in_4bit, model_args.load_in_8bit, model_args.bnb_4bit_quant_type,
                              compute, model_args.use_bnb_nested_quant, model_args.bnb_4bit_quant_storage)
    kwargs = {}
    if quantization is not None:
        if not model_args.use_peft:
            raise ValueError("--load_in_4bit/--load_in_8bit train adapters over frozen quantized weights: add "
                             "--use_peft (QLoRA); quantized weights themselves cannot be trained")
        if getattr(training_args, "fsdp", None) or getattr(training_args, "deepspeed", None):
            raise ValueError("--load_in_4bit/--load_in_8bit with FSDP or DeepSpeed is not supported by this trainer; "
                             "use DDP (accelerate launch) or one process")
        device_map = kbit_device_map()
        device = device_map[""]
        require_bitsandbytes(f"cuda:{device}" if isinstance(device, int) else device)
        kwargs = {"quantization_config": quantization, "device_map": device_map}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", revision=model_args.model_revision,
                                                 attn_implementation=model_args.attn_implementation,
                                                 trust_remote_code=trust, **kwargs)
    if quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        restore_compute_dtype(model, compute)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision, trust_remote_code=trust)
    return model, tokenizer


def main(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelConfig,
         dm_args: DiffMASArguments) -> DiffMASSFTTrainer:
    chain = dm_args.to_config()
    model, tokenizer = load_training_model(model_args, training_args)
    prepare_tokenizer(tokenizer)
    dataset = load_data(script_args.dataset_name, script_args.dataset_config)
    test_split = script_args.dataset_test_split
    trainer = DiffMASSFTTrainer(
        model, args=training_args, diffmas_config=chain, trainable_realign=dm_args.train_realign,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[test_split] if training_args.eval_strategy != "no" and test_split in dataset else None,
        processing_class=tokenizer, peft_config=get_peft_config(model_args))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    return trainer


def parser(arguments: type | None = None) -> TrlParser:
    """TRL's parser over its own arguments and ``arguments`` (default ``DiffMASArguments``)."""
    p = TrlParser((ScriptArguments, SFTConfig, ModelConfig, arguments or DiffMASArguments))
    p.set_defaults(lora_r=8, lora_alpha=16)  # DiffMAS default: rank-8 LoRA shared by all roles
    if not torch.cuda.is_available():  # TRL defaults to bf16, which refuses to start on a CPU-only machine
        p.set_defaults(bf16=False, use_cpu=True)
    return p


def cli(argv: list[str] | None = None) -> None:
    if os.environ.get("LOCAL_RANK") is not None:  # a rank of accelerate launch: it ends with its launcher
        die_with_parent(signal.SIGKILL)
    main(*parser().parse_args_and_config(argv))


if __name__ == "__main__":
    cli()
