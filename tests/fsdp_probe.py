"""One DiffMAS SFT step under torch's FSDP2, or in one process: ``fsdp_probe.py MODEL_DIR OUT [--checkpoint]``
(``--no-unshard-hook``, ``--inner-hidden-state``: a guard of the chain's switched off, for the regression checks).

Why torch directly: accelerate 1.x runs FSDP only on GPUs; with ``ACCELERATE_USE_CPU=1`` the same launch
with ``trainers/configs/fsdp.yaml`` silently becomes DDP, so a green run there proves nothing about
sharding. Here each process builds the package's own ``DiffMASSFTTrainer`` (TRL's dataset preparation,
collator and our ``compute_loss``, which runs the whole chain), then shards the PEFT model as
``fsdp.yaml`` asks accelerate to on GPUs: ``fully_shard`` on every decoder layer, then on the root, with
``reshard_after_forward=True``, on a ``cpu`` device mesh over gloo. A chain step calls the model many
times (every agent's prompt, every latent step, the final agent), so every layer is unsharded and
resharded once per call in forward and again in backward; the trace's cache tensors are ordinary
(unsharded) activations that cross those calls.

Run under ``torchrun --nproc_per_node 2`` the 4 rows of the global batch are split 2 + 2 (rank r takes
rows 2r, 2r+1); alone, one process takes all 4. Writes (rank 0) ``OUT/step.json`` (the loss of the global
batch, world size, the number of model calls and whether any asked for every layer's hidden state),
``OUT/grads.pt`` (every LoRA gradient, gathered to full tensors) and, after one SGD step, the adapter
(``OUT/adapter``: PEFT files + ``diffmas.json``) from the gathered full state dict.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

from diffmas_eval.latent import LatentConfig
from diffmas_eval.latent.persist import save_chain_config
from diffmas_eval.training.trainer import DiffMASSFTTrainer

ROWS = [  # different lengths: the loss is normalised by the target tokens of the global batch
    {"prompt": "Question: What is 12 + 30?\nAnswer:", "completion": " 42"},
    {"prompt": "Question: Which animal barks? (A) fox (B) dog\nAnswer:", "completion": " (B) dog, the one that barks"},
    {"prompt": "Question: What is 2 + 3?\nAnswer:", "completion": " 5"},
    {"prompt": "The quick brown fox jumps over the lazy what?", "completion": " dog"},
]


def main(model_dir: str, out: str, checkpoint: bool) -> None:
    out_dir = Path(out)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(output_dir=str(out_dir / "trainer"), use_cpu=True, report_to="none", max_length=256,
                     per_device_train_batch_size=len(ROWS) // world, gradient_checkpointing=checkpoint,
                     save_strategy="no", seed=0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM")
    trainer = DiffMASSFTTrainer(model, args, diffmas_config=LatentConfig.from_dict({"agents": 3, "latent_steps": 2}),
                                train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer, peft_config=lora)
    assert trainer.diffmas_config.checkpoint_agents is checkpoint  # --gradient_checkpointing -> per-agent
    peft_model = trainer.model
    full = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    n_items = int((full["labels"][:, 1:] != -100).sum())  # target tokens of the global batch
    rank = dist.get_rank() if world > 1 else 0
    rows = list(range(len(ROWS))) if world == 1 else [2 * rank, 2 * rank + 1]
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in rows])

    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        layers = peft_model.get_base_model().model.layers
        for layer in layers:  # TRANSFORMER_BASED_WRAP: one FSDP unit per decoder layer, then the root
            fully_shard(layer, mesh=mesh, reshard_after_forward=True)
        fully_shard(peft_model, mesh=mesh, reshard_after_forward=True)
        assert type(layers[0].self_attn.q_proj.lora_A["default"].weight).__name__ == "DTensor"

    # did any forward ask for every layer's hidden state? (stage 1 reads only the last one). Counted on the decoder,
    # which every forward runs through: one process calls it alone in stage 1 (no LM head), while an FSDP2 model is
    # called whole (its root's hooks gather and free the shards)
    asked = []
    peft_model.get_base_model().model.register_forward_pre_hook(
        lambda m, args, kwargs: asked.append(bool(kwargs.get("output_hidden_states"))), with_kwargs=True)
    peft_model.train()
    # compute_loss scales by the number of processes (average_tokens_across_devices); FSDP2 averages the
    # gradients over them, so rank r's loss * world / n_items, averaged, is the global sum / n_items
    loss = trainer.compute_loss(peft_model, inputs, num_items_in_batch=n_items)
    loss.backward()
    loss_global = loss.detach() / (trainer.accelerator.num_processes if args.average_tokens_across_devices else 1)
    if world > 1:
        dist.all_reduce(loss_global)
    grads = {}
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            g = p.grad
            grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(peft_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = peft_model.state_dict()
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(grads, out_dir / "grads.pt")
        (out_dir / "step.json").write_text(json.dumps({"loss": float(loss_global), "world_size": world,
                                                       "n_items": n_items, "forwards": len(asked),
                                                       "asked_hidden_states": any(asked)}))
        # PEFT picks the adapter's entries out of the gathered full state dict
        peft_model.save_pretrained(out_dir / "adapter", state_dict=state)
        save_chain_config(out_dir / "adapter", trainer.diffmas_config, trainer.chain)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    if "--no-unshard-hook" in sys.argv[3:]:  # the regression check: what the chain's hook prevents
        from diffmas_eval.latent import distributed

        distributed.unshard_in_backward = lambda *args: None
    if "--inner-hidden-state" in sys.argv[3:]:  # the regression check: stage 1's state not passed out of the model
        from diffmas_eval.latent import chain

        chain._pass_on = lambda output, last: output
    main(sys.argv[1], sys.argv[2], "--checkpoint" in sys.argv[3:])
