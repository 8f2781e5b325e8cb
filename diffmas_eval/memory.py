"""What the latent trace costs, from a model's config alone (``diffmas-eval memory``).

The trace stores, for every position, one key and one value vector per KV head in every layer. The
arithmetic ``2 x layers x kv_heads x head_dim x bytes`` hides details that differ between architectures
(``head_dim`` set apart from ``hidden / heads``, separate key and value widths, layers without a cache,
sliding-window layers, which the chain's cache keeps in full). So instead of re-deriving each family's
rules, the model is built on the ``meta`` device (no weights, no memory) and one token is run through it
into a ``DynamicCache`` exactly as the chain does; the cache's per-layer shapes then give the bytes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class TraceMemory:
    model: str
    architecture: str
    dtype: str
    layers: dict[str, int]  # "kv_heads x key_dim / value_dim" -> number of layers with that cache shape
    bytes_per_position: int
    agents: int
    latent_steps: int
    prompt_tokens: list[int]  # per upstream agent: its role prompt with the question
    trace_positions: int
    trace_bytes: int  # stage 1: what the final agent reads, per question
    final_tokens: int  # stage 2: the final agent's prompt and answer, on top of the trace
    total_bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


def load_text_config(model: str):
    """The text model's config of a hub id or local path (multimodal configs hold it as a sub-config)."""
    from transformers import AutoConfig

    from .models import resolve_pretrained

    try:
        config = AutoConfig.from_pretrained(resolve_pretrained(model))
    except OSError as err:
        raise ValueError(f"cannot read the config of {model!r}: {err}. Pass a hub id or a directory "
                         "with config.json") from err
    return config.get_text_config()


def cache_shapes(config, dtype: torch.dtype) -> list[tuple[int, int, int]]:
    """Per layer with a KV cache: (kv_heads, key_dim, value_dim), read off a one-token forward on ``meta``."""
    from transformers import AutoModelForCausalLM, DynamicCache

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device="meta"), cache=cache, use_cache=True,
                  logits_to_keep=1)
    except Exception as err:  # any architecture whose forward does not fill a plain DynamicCache
        raise ValueError(f"cannot measure the KV cache of {type(config).__name__} ({config.model_type}): "
                         f"{type(err).__name__}: {err}. The latent trace needs a causal LM whose every layer "
                         "keeps a key/value cache (transformers' DynamicCache)") from err
    shapes = [(layer.keys.shape[1], layer.keys.shape[-1], layer.values.shape[-1])
              for layer in cache.layers if getattr(layer, "keys", None) is not None and layer.keys.numel() > 0]
    if not shapes:
        raise ValueError(f"{type(config).__name__} filled no key/value cache; the latent trace cannot be held")
    return shapes


def trace_memory(model: str, agents: int = 4, latent_steps: int = 10, prompt_tokens: int | list[int] = 200,
                 final_tokens: int = 0, dtype: str = "bfloat16", config=None) -> TraceMemory:
    """Bytes of one question's trace (``trace=concat``): the upstream agents' prompts and latent steps.

    ``prompt_tokens``: one count for every upstream agent, or one per upstream agent (``agents - 1``).
    ``final_tokens``: the final agent's prompt plus answer, added on top of the trace in stage 2.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if agents < 1 or latent_steps < 0 or final_tokens < 0:
        raise ValueError("need agents >= 1, latent_steps >= 0 and final_tokens >= 0")
    upstream = agents - 1
    prompts = [prompt_tokens] * upstream if isinstance(prompt_tokens, int) else list(prompt_tokens)
    if len(prompts) != upstream or any(p < 1 for p in prompts):
        raise ValueError(f"prompt_tokens: give one count >= 1, or one per upstream agent ({upstream})")
    config = config if config is not None else load_text_config(model)
    torch_dtype = DTYPES[dtype]
    shapes = cache_shapes(config, torch_dtype)
    per_position = sum(heads * (k + v) for heads, k, v in shapes) * torch_dtype.itemsize
    positions = sum(p + latent_steps for p in prompts)
    layers = Counter(f"{h} x {k}" + (f" / {v}" if v != k else "") for h, k, v in shapes)
    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    return TraceMemory(model, arch, dtype, dict(layers), per_position, agents, latent_steps, prompts, positions,
                       positions * per_position, final_tokens, (positions + final_tokens) * per_position)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def format_memory(m: TraceMemory) -> str:
    layers = ", ".join(f"{n} layers of {shape}" for shape, n in m.layers.items())
    prompts = f"{m.prompt_tokens[0]}" if len(set(m.prompt_tokens)) == 1 else "/".join(map(str, m.prompt_tokens))
    lines = [f"{m.model} ({m.architecture}, {m.dtype}): KV heads x head dim: {layers}",
             f"per position: {m.bytes_per_position:,} bytes ({human(m.bytes_per_position)})",
             f"trace per question: {m.agents - 1} upstream agents x ({prompts} prompt + {m.latent_steps} latent) = "
             f"{m.trace_positions:,} positions: {m.trace_bytes:,} bytes ({human(m.trace_bytes)})"]
    if m.final_tokens:
        lines.append(f"with the final agent's {m.final_tokens:,} prompt + answer tokens: {m.total_bytes:,} bytes "
                     f"({human(m.total_bytes)})")
    return "\n".join(lines)
