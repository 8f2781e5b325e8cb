"""QLoRA keeps the compute dtype: after PEFT's ``prepare_model_for_kbit_training`` (which casts every
non-quantized weight to float32) the frozen weights go back, so the residual stream and the latent trace are in
the compute dtype, not float32 (twice the trace and activation memory)."""

from __future__ import annotations

import pytest
import torch
from peft import prepare_model_for_kbit_training

from diffmas_eval.latent.chain import AgentChain
from diffmas_eval.latent.config import LatentConfig
from diffmas_eval.testing.tiny import make_tiny_model
from diffmas_eval.training.sft import restore_compute_dtype

QUESTIONS = ["What is 2 + 3?", "Why?"]


def _trace_dtype(model, tok) -> torch.dtype:
    with torch.no_grad():
        trace = AgentChain(model, tok, LatentConfig(latent_steps=2)).stage1(QUESTIONS)
    return {k.dtype for k in trace.keys + trace.values}.pop()


def test_prepared_weights_go_back_to_the_compute_dtype_and_so_does_the_trace():
    """PEFT's preparation casts half weights whether or not they are quantized, so a bfloat16 tiny model shows
    what it does to a 4-bit one's embeddings, ``lm_head`` and norms (bitsandbytes keeps its own 4-bit storage)."""
    model, tok = make_tiny_model("qwen3")
    model = model.to(torch.bfloat16)
    model.is_loaded_in_4bit = True  # what PEFT reads; the weights themselves stay plain here
    names = [n for n, _ in model.named_parameters()]
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert _trace_dtype(model, tok) == torch.float32  # what QLoRA training ran on before
    assert restore_compute_dtype(model, torch.bfloat16) == len(names)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())
    assert _trace_dtype(model, tok) == torch.bfloat16
    assert restore_compute_dtype(model, torch.float32) == 0  # a float32 compute dtype: nothing to do


def test_trainable_and_quantized_parameters_are_left_alone():
    model, _ = make_tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)  # trainable: kept in float32
    quantized = torch.nn.Parameter(torch.zeros(4, dtype=torch.uint8), requires_grad=False)
    model.register_parameter("packed", quantized)
    restore_compute_dtype(model, torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.float32 and model.packed.dtype == torch.uint8
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_a_4bit_training_model_loads_in_its_compute_dtype(tiny_path):
    """The real path (``load_training_model``, bitsandbytes 4-bit on this CPU) with a bfloat16 compute dtype."""
    pytest.importorskip("bitsandbytes")
    from trl import ModelConfig, SFTConfig

    from diffmas_eval.training.sft import load_training_model

    args = ModelConfig(model_name_or_path=str(tiny_path), dtype="bfloat16", load_in_4bit=True, use_peft=True,
                       bnb_4bit_quant_type="nf4")
    model, tok = load_training_model(args, SFTConfig(output_dir="unused", use_cpu=True, bf16=False))
    assert model.is_loaded_in_4bit
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    assert floats == {torch.bfloat16}, floats
    assert _trace_dtype(model, tok) == torch.bfloat16
