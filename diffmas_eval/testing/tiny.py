"""Tiny random models of the real transformers classes with a real BPE tokenizer, built in seconds.

They exercise exactly the code paths of the big models (RoPE, GQA, chat template, KV cache, and the
attention layouts users bring: full attention in Llama/Qwen3; sliding-window layers mixed with full
ones in Gemma 2/3, Ministral and Qwen3 with ``layer_types``; all-sliding Mistral; Gemma's scaled input
embeddings) with no download. The sliding window (``SLIDING_WINDOW``) is far shorter than a trace.
``save_tiny_model`` writes a normal checkpoint directory, so anything that takes a
model path (lm-eval's ``hf``, ``trainers/sft.py``) can be tested against it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MinistralConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
)

SLIDING_WINDOW = 24
MIXED = ["sliding_attention", "full_attention"]  # one layer of each
ARCHS = {
    "llama": lambda c: LlamaConfig(**c),
    "qwen3": lambda c: Qwen3Config(**c),
    "gemma3": lambda c: Gemma3TextConfig(**c, sliding_window=SLIDING_WINDOW, layer_types=MIXED),
    "gemma2": lambda c: Gemma2Config(**c, sliding_window=SLIDING_WINDOW, layer_types=MIXED),
    "ministral": lambda c: MinistralConfig(**c, sliding_window=SLIDING_WINDOW, layer_types=MIXED),
    "mistral": lambda c: MistralConfig(**c, sliding_window=SLIDING_WINDOW),
    "qwen3-swa": lambda c: Qwen3Config(**c, use_sliding_window=True, sliding_window=SLIDING_WINDOW,
                                       max_window_layers=1, layer_types=MIXED),
}
# vLLM's CPU attention refuses head_dim 16, and its Gemma 2/3 load no separate lm_head (they are tied, as real Gemmas)
VLLM_SERVABLE = {"head_dim": 32, "tie_word_embeddings": True}
SLIDING_ARCHS = ("gemma3", "gemma2", "ministral", "mistral", "qwen3-swa")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# templates of the kinds users' models ship: system message taken (CHAT_TEMPLATE); refused (Gemma);
# roles must alternate user/assistant from the first message (Mistral-7B-Instruct v0.1/v0.2)
NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<|im_start|>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>model\n{% endif %}"
)
ALTERNATING_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}<|im_end|>"
    "{% endif %}{% endfor %}"
)
TEMPLATES = {"system": CHAT_TEMPLATE, "no_system": NO_SYSTEM_TEMPLATE, "alternating": ALTERNATING_TEMPLATE}
_CORPUS = [
    "You are a planner. Plan the steps to solve the question. You are a critic. Check the plan.",
    "You are a refiner. Improve the plan. You are the solver. Give the final answer in \\boxed{}.",
    "Question: what is 12 + 30? Answer: 42. The answer is (A) (B) (C) (D). Let's think step by step.",
    "def add(a, b):\n    return a + b\nimport math\nprint(math.sqrt(16))",
    "The quick brown fox jumps over the lazy dog. Which option is correct? system user assistant",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 = + - * / ( ) { } [ ] < > ? ! . , : ; # $ % ^ & _ | ~ ' \"",
]


def make_tokenizer(vocab_size: int = 384, template: str = "system") -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = TEMPLATES[template]
    fast.padding_side = "left"
    return fast


def make_tiny_model(arch: str = "llama", seed: int = 0, context: int = 4096, template: str = "system",
                    **overrides):
    """Return ``(model, tokenizer)``: 2 layers, hidden 64, 4 query / 2 KV heads, float32, eval mode
    (``arch``: a key of ``ARCHS``; ``template``: a key of ``TEMPLATES``; ``overrides``: config values, e.g.
    ``VLLM_SERVABLE`` for a checkpoint that vLLM's CPU build serves)."""
    tokenizer = make_tokenizer(template=template)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=context,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    config = ARCHS[arch](common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), tokenizer


def save_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, template: str = "system",
                    **overrides) -> Path:
    model, tokenizer = make_tiny_model(arch, seed, template=template, **overrides)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
