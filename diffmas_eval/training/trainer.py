"""``DiffMASSFTTrainer``: TRL's SFTTrainer, with the loss computed through the whole agent chain.

Everything TRL users rely on stays TRL's: dataset preparation (prompt/completion, conversational),
``peft_config``, ``SFTConfig``, logging, checkpoints, resuming, evaluation, accelerate. Only the
loss changes: stage 1 runs the upstream agents over the *prompt* (never the completion), stage 2
runs the final agent teacher-forced on TRL's prompt + completion tokens over the trace, and the
cross-entropy on completion tokens is normalised as TRL normalises it (by the number of target
tokens in the accumulated batch).

Two things are refused or redirected on purpose:
- ``gradient_checkpointing=True`` (TRL's default) makes transformers drop the KV cache in training
  mode, which would silently cut the latent trace. It is turned into per-agent activation
  checkpointing (``checkpoint_agents``), which recomputes each agent's forward in backward.
- ``packing`` / ``padding_free`` put several examples in one row; the chain needs one question per row.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict
from torch import nn
from trl import SFTConfig, SFTTrainer

from ..latent import AgentChain, LatentConfig
from ..latent.persist import save_chain_config
from ..models import quantization_record
from ..prompts import TEXT_ROLES, final_preamble, last_user_turn

logger = logging.getLogger(__name__)
QUESTION = "diffmas_question"


def question_of(prompt: Any) -> str:
    """The bare question upstream agents read: a string prompt, or the last user turn of a chat."""
    if isinstance(prompt, str):
        return prompt
    last = last_user_turn(prompt)
    if last is None:
        raise ValueError("a conversational prompt needs a user message")
    return prompt[last]["content"]


def with_note(prompt: Any, note: str) -> Any:
    """The final agent's prompt: the trace note before the task, as ``lm_eval --model diffmas`` builds it."""
    if not note:
        return prompt
    if isinstance(prompt, str):
        return note + prompt
    messages = [dict(m) for m in prompt]
    last = last_user_turn(messages)
    messages[last]["content"] = note + messages[last]["content"]
    return messages


def prepare_dataset(dataset, config: LatentConfig, tokenizer, max_length: int | None):
    """Check every row, keep the bare question, and put the trace note in the final agent's prompt."""
    if dataset is None:
        return None
    if isinstance(dataset, (dict, DatasetDict)):
        return {k: prepare_dataset(v, config, tokenizer, max_length) for k, v in dataset.items()}
    columns = set(dataset.column_names)
    if not {"prompt", "completion"} <= columns:
        raise ValueError(f"DiffMAS SFT needs prompt/completion rows (upstream agents read the prompt, the loss is on "
                         f"the completion); this dataset has columns {sorted(columns)}")
    note = final_preamble(config.upstream)

    def convert(row: dict, idx: int) -> dict:
        if not row["prompt"] or not row["completion"]:
            empty = "prompt" if not row["prompt"] else "completion"
            raise ValueError(f"row {idx}: empty {empty}; every row needs a prompt and a completion")
        if max_length is not None:
            prompt = row["prompt"]
            ids = (tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
                   if not isinstance(prompt, str) else tokenizer(prompt, add_special_tokens=False)["input_ids"])
            n = len(ids["input_ids"] if isinstance(ids, dict) else ids)
            if n + len(tokenizer(note)["input_ids"]) >= max_length:
                raise ValueError(f"row {idx}: the prompt has {n} tokens (plus the trace note) but max_length="
                                 f"{max_length} leaves no room for the completion; raise max_length or drop the row")
        return {QUESTION: question_of(row["prompt"]), "prompt": with_note(row["prompt"], note)}

    return dataset.map(convert, with_indices=True, desc="DiffMAS: questions and final-agent prompts")


class _WithQuestions:
    """Wrap TRL's collator: pass the bare questions of the batch through to ``compute_loss``."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collator(examples)
        batch[QUESTION] = [ex[QUESTION] for ex in examples]
        return batch


class _CallThrough(nn.Module):
    """What the chain gets as its model under DDP/FSDP: calls go through the wrapper (so the wrapper
    syncs gradients), attribute reads (``config``, ``get_input_embeddings``) go to the model inside,
    which the wrappers do not expose. Neither is registered as a submodule (no second parameter copy)."""

    def __init__(self, wrapped: nn.Module, inner: nn.Module):
        super().__init__()
        object.__setattr__(self, "_wrapped", wrapped)
        object.__setattr__(self, "_inner", inner)
        del self.__dict__["training"]  # read the inner model's train/eval mode

    def forward(self, *args, **kwargs):
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(object.__getattribute__(self, "_inner"), name)


def _name(choice) -> str:
    """An enum option of TrainingArguments (or a plain string) as its name."""
    return str(getattr(choice, "value", choice))


class DiffMASSFTTrainer(SFTTrainer):
    def __init__(self, model, args: SFTConfig | None = None, *, diffmas_config: LatentConfig | None = None,
                 trainable_realign: bool = False, train_dataset: Dataset | None = None,
                 eval_dataset: Dataset | dict | None = None, processing_class=None, **kwargs):
        config = diffmas_config or LatentConfig()
        config.check_roles(TEXT_ROLES)
        args = args or SFTConfig(output_dir="out")
        if args.packing or args.padding_free:
            raise ValueError("packing/padding_free put several examples in one row; DiffMAS needs one question per "
                             "row: set packing=False and padding_free=False")
        if args.gradient_checkpointing or getattr(args, "activation_checkpointing", False):
            logger.info("DiffMAS: gradient_checkpointing -> per-agent activation checkpointing (the model-level "
                        "one would turn the KV cache, and with it the latent trace, off in training mode)")
            config.checkpoint_agents = True
            args.gradient_checkpointing = False
            if hasattr(args, "activation_checkpointing"):  # its name from transformers 5.2x on
                args.activation_checkpointing = False
        if processing_class is None:
            from transformers import AutoTokenizer

            processing_class = AutoTokenizer.from_pretrained(
                model if isinstance(model, str) else model.config._name_or_path)
        train_dataset = prepare_dataset(train_dataset, config, processing_class, args.max_length)
        eval_dataset = prepare_dataset(eval_dataset, config, processing_class, args.max_length)
        super().__init__(model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, **kwargs)
        self.diffmas_config = config
        self.chain = AgentChain(self.model, self.processing_class, config, trainable_realign=trainable_realign)
        if trainable_realign:  # a submodule of the model, so the optimizer and accelerate see it
            self.model.add_module("diffmas_realigner", self.chain.realigner)
        self.data_collator = _WithQuestions(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if QUESTION not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, QUESTION]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
            raise RuntimeError("model-level gradient checkpointing is on: transformers drops the KV cache in training "
                               "mode, which cuts the latent trace; use DiffMAS's checkpoint_agents instead")
        inner = self.accelerator.unwrap_model(model)
        # always call the model compute_loss receives: the accelerate-wrapped one syncs gradients (DDP, FSDP)
        self.chain.model = model if inner is model else _CallThrough(model, inner)
        rows, labels = [], []
        for ids, mask, lab in zip(inputs["input_ids"], inputs["attention_mask"], inputs["labels"]):
            real = mask.bool()
            rows.append(ids[real].tolist())
            labels.append(lab[real].tolist())
        trace = self.chain.stage1(inputs[QUESTION], final_tokens=[len(r) for r in rows])
        loss_sum = self.chain.loss(trace, rows, labels, reduction="sum")
        n_tokens = sum(x != -100 for lab in labels for x in lab[1:])
        denominator = n_tokens if num_items_in_batch is None else num_items_in_batch
        loss = loss_sum / torch.as_tensor(denominator, device=loss_sum.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        mode = "train" if model.training else "eval"
        self._metrics[mode]["trace_tokens"].append(float(trace.length))
        if return_outputs:
            return loss, {"loss": loss}
        return loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """TRL's save (adapter or model), plus the chain's configuration and a trained realignment."""
        super().save_model(output_dir, _internal_call)
        a, lora = self.args, getattr(self.model, "peft_config", {}).get("default")
        training = {  # provenance (the recipe as it ran), beside the chain's options
            "learning_rate": a.learning_rate, "lr_scheduler_type": _name(a.lr_scheduler_type), "optim": _name(a.optim),
            "per_device_train_batch_size": a.per_device_train_batch_size,
            "gradient_accumulation_steps": a.gradient_accumulation_steps, "world_size": a.world_size,
            "max_steps": a.max_steps, "num_train_epochs": a.num_train_epochs, "seed": a.seed,
            "global_step": self.state.global_step,
            "lora_r": getattr(lora, "r", None), "lora_alpha": getattr(lora, "lora_alpha", None),
            "quantization": quantization_record(self.accelerator.unwrap_model(self.model))}  # QLoRA: what it ran over
        save_chain_config(Path(output_dir or self.args.output_dir), self.diffmas_config, self.chain, training)
