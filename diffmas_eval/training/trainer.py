"""``DiffMASSFTTrainer``: TRL's SFTTrainer, with the loss computed through the whole agent chain.

Everything TRL users rely on stays TRL's: dataset preparation (prompt/completion, conversational),
``peft_config``, ``SFTConfig``, logging, checkpoints, resuming, evaluation, accelerate. Only the
loss changes: stage 1 runs the upstream agents over the *prompt* (never the completion), stage 2
runs the final agent teacher-forced on TRL's prompt + completion tokens over the trace, and the
cross-entropy on completion tokens is normalised as TRL normalises it (by the number of target
tokens in the accumulated batch).

Every save (``save_model``, checkpoints, ``push_to_hub``) writes the trained chain beside the adapter: its options
(``diffmas.json``), a trained realignment and a model card (``latent/persist.py``), so the folder TRL pushes to the
Hub is a trained chain that ``lm_eval --model diffmas`` and ``diffmas-eval ask`` rebuild from a repo id.

Two things are refused or redirected on purpose:
- ``gradient_checkpointing=True`` (TRL's default) makes transformers drop the KV cache in training
  mode, which would silently cut the latent trace. It is turned into per-agent activation
  checkpointing (``checkpoint_agents``), which recomputes each agent's forward in backward.
- ``packing`` / ``padding_free`` put several examples in one row; the chain needs one question per row.
"""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

from ..latent import AgentChain, LatentConfig
from ..latent.distributed import CallThrough
from ..latent.persist import CARD_FILE, CONFIG_FILE, REALIGN_FILE, save_chain_config, write_model_card
from ..models import quantization_record
from ..prompts import TEXT_ROLES, final_preamble, final_prompt_ids, last_user_turn, with_note

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


def training_row(tokenizer, upstream: list[str], prompt: Any, completion: Any,
                 enable_thinking: bool | None = None) -> tuple[list[int], list[int]]:
    """One prompt/completion row as the trainer trains it: the final agent's ids (its prompt, ``prompts.
    final_prompt_ids``, then the completion with EOS, tokenized together as TRL tokenizes them) and the labels
    (-100 on the prompt). What the gradient probe differentiates, so it measures the loss training descends."""
    note_prompt = with_note(prompt, final_preamble(upstream))
    prompt_ids = final_prompt_ids(tokenizer, upstream, prompt, enable_thinking)
    eos = tokenizer.eos_token or ""
    if isinstance(completion, str):
        full_text = note_prompt + (completion if completion.endswith(eos) else completion + eos)
        ids = list(tokenizer(text=full_text)["input_ids"])
    else:
        kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        ids = list(tokenizer.apply_chat_template(note_prompt + completion, tokenize=True, return_dict=True,
                                                 **kwargs)["input_ids"])
    n = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids)))
    return ids, [-100] * n + ids[n:]


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


LOSS_FILE = "loss.csv"


def write_loss_curve(directory: Path, log_history: list[dict]) -> list[dict]:
    """The training loss per logged step (the trainer's log history) as ``loss.csv``; returns its rows.

    Kept beside the adapter because the log history otherwise lives only in checkpoints, which the leaderboard
    deletes once the adapter is finished."""
    rows = [{"step": h.get("step"), "epoch": h.get("epoch"), "loss": h["loss"],
             "learning_rate": h.get("learning_rate")} for h in log_history if "loss" in h]
    if rows:
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / LOSS_FILE, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows


def refuse_offloaded(model: torch.nn.Module) -> None:
    """Refuse, before any compute, a model with offloaded weights: a ``device_map`` that puts modules on
    ``disk`` (or on ``cpu`` beside GPUs, which accelerate offloads too) leaves their parameters on ``meta`` and
    loads them for each forward only, so neither their LoRA adapters nor backward can use them (the step fails
    in backward: "expected device meta"). A model split over GPUs only (every parameter on a real device)
    trains, stage 1 with autograd included: each layer's trace lives on its device."""
    offloaded = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        placed = getattr(model, "hf_device_map", None) or getattr(getattr(model, "base_model", None),
                                                                   "hf_device_map", None)
        where = f" (hf_device_map: {placed})" if placed else ""
        raise ValueError(
            f"{len(offloaded)} parameters of the model are offloaded (on meta, loaded per forward; first: "
            f"{offloaded[0]}){where}: DiffMAS training needs every weight on a device it runs on, for its "
            "adapters and for backward through the chain. Fit the model on the GPUs: a device_map over GPUs "
            "only, or 4-bit QLoRA (--load_in_4bit --use_peft); offloading is for evaluation")


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
        if not isinstance(model, str):
            refuse_offloaded(model)
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(
                model if isinstance(model, str) else model.config.name_or_path)
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
        self.chain.model = model if inner is model else CallThrough(model, inner)
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

    # -- saving: diffmas.json, the trained realignment and a model card go wherever TRL saves the adapter -------
    def _save(self, output_dir: str | None = None, state_dict=None):
        """TRL's save (adapter or model), then the chain beside it. Every save goes through here (``save_model``,
        checkpoints, ``push_to_hub``'s own save), so the files are in the folder before TRL uploads it."""
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            self._save_chain(Path(output_dir or self.args.output_dir))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """TRL's ``save_model``; a save that does not reach ``_save`` (FSDP's sharded state dict) gets the chain too."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self._save_chain(Path(output_dir or self.args.output_dir))

    def _recipe(self) -> dict:
        a, lora = self.args, getattr(self.model, "peft_config", {}).get("default")
        return {  # provenance (the recipe as it ran), beside the chain's options
            "learning_rate": a.learning_rate, "lr_scheduler_type": _name(a.lr_scheduler_type), "optim": _name(a.optim),
            "per_device_train_batch_size": a.per_device_train_batch_size,
            "gradient_accumulation_steps": a.gradient_accumulation_steps, "world_size": a.world_size,
            "max_steps": a.max_steps, "num_train_epochs": a.num_train_epochs, "seed": a.seed,
            "global_step": self.state.global_step,
            "lora_r": getattr(lora, "r", None), "lora_alpha": getattr(lora, "lora_alpha", None),
            "quantization": quantization_record(self.accelerator.unwrap_model(self.model))}  # QLoRA: what it ran over

    def _base_model(self) -> str | None:
        lora = getattr(self.model, "peft_config", {}).get("default")
        return getattr(lora, "base_model_name_or_path", None) or getattr(self.model.config, "_name_or_path", None)

    def _save_chain(self, directory: Path) -> None:
        training = self._recipe()
        losses = write_loss_curve(directory, self.state.log_history)
        if losses:  # a reader of the adapter sees that training happened, and how the loss went
            training.update(loss_first=losses[0]["loss"], loss_last=losses[-1]["loss"], loss_steps=len(losses))
        save_chain_config(directory, self.diffmas_config, self.chain, training)
        write_model_card(directory, self.diffmas_config, self._base_model(), training, self.args.hub_model_id)

    def create_model_card(self, *args, **kwargs):
        """TRL's card (``push_to_hub`` writes it over the folder's README.md), after the chain's own."""
        super().create_model_card(*args, **kwargs)
        if not self.is_world_process_zero():
            return
        card = Path(self.args.output_dir) / CARD_FILE
        trl = card.read_text() if card.exists() else ""
        if trl.startswith("---"):  # one front matter: the chain's
            trl = trl.split("---", 2)[-1]
        write_model_card(card.parent, self.diffmas_config, self._base_model(), self._recipe(), self.args.hub_model_id)
        if trl.strip():
            card.write_text(card.read_text() + "\n## Training framework (TRL's card)\n" + trl)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """``hub_strategy`` pushes of checkpoints copy only the model's files to output_dir: the chain's too."""
        if self.is_world_process_zero():
            for name in (CONFIG_FILE, REALIGN_FILE, CARD_FILE):
                if (Path(checkpoint_folder) / name).exists():
                    shutil.copy(Path(checkpoint_folder) / name, Path(self.args.output_dir) / name)
        super()._push_from_checkpoint(checkpoint_folder)
