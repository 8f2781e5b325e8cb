"""What the latent trace costs, from a model's config alone (``diffmas-eval memory``).

The trace stores, for every position, one key and one value vector per KV head in every layer. The
arithmetic ``2 x layers x kv_heads x head_dim x bytes`` hides details that differ between architectures
(``head_dim`` set apart from ``hidden / heads``, separate key and value widths as in DeepSeek's MLA,
layers without a cache, sliding-window layers, which the chain's cache keeps in full). So instead of
re-deriving each family's rules, the model is built on the ``meta`` device (no weights, no memory) and one
token is run through it into a ``DynamicCache`` exactly as the chain does; the cache's per-layer shapes
then give the bytes.

``bytes_per_position`` is the one definition of that estimate: ``diffmas-eval memory`` (``trace_memory``)
and ``--batch_size auto`` (``harness/batching.py``'s ``RowCost``) both use it, and it equals what a real
trace holds per row and position (``LatentTrace.bytes_per_position``, which measures its own tensors;
``tests/test_memory.py`` checks the two agree).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import asdict, dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedModel

from .models import TRACE_DTYPES, resolve_pretrained, torch_dtype


def trace_positions(prompts: list[int], latent_steps: int, independent: bool = False) -> int:
    """Positions of one row's stage-1 trace: each upstream agent's prompt tokens and its ``latent_steps``
    latent positions, appended (``trace=concat``/``overwrite`` write them all). ``independent`` (``stitch``,
    ``hierarchical``): the positions the final agent's numbering continues after, the longest segment's. The one
    count the budget check (``latent.chain.check_budget``), ``--batch_size auto`` and ``diffmas-eval memory`` use."""
    segments = [p + latent_steps for p in prompts]
    return max(segments, default=0) if independent else sum(segments)


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
    try:
        config = AutoConfig.from_pretrained(resolve_pretrained(model))
    except OSError as err:
        raise ValueError(f"cannot read the config of {model!r}: {err}. Pass a hub id or a directory "
                         "with config.json") from err
    return config.get_text_config()


_SHAPES: dict[tuple, tuple[tuple[int, int, int], ...]] = {}  # cache_shapes' results; shapes do not depend on dtype


def cache_shapes(config, dtype: torch.dtype = torch.bfloat16, model_class=None) -> list[tuple[int, int, int]]:
    """Per layer with a KV cache: (kv_heads, key_dim, value_dim), read off a one-token forward on ``meta``.

    ``model_class``: the class to build (a loaded model's own, e.g. remote code); default: the causal LM
    that ``AutoModelForCausalLM`` maps ``config`` to. The config is copied: building a model writes its
    dtype and attention implementation into the config, which must not touch a live model's. The shapes do
    not depend on the dtype, so a build that fails in ``dtype`` is retried in bfloat16 (on ``meta``, MoE
    experts' grouped matmul accepts only bfloat16). Results are remembered per config (building a large
    model on ``meta`` takes a moment, and ``--batch_size auto:N`` asks N times).
    """
    try:
        key = (model_class, type(config), config.to_json_string(use_diff=False))
    except (TypeError, ValueError):  # a config value JSON cannot write: measure every time
        key = None
    if key is not None and key in _SHAPES:
        return list(_SHAPES[key])

    def measure(build_dtype: torch.dtype) -> DynamicCache:
        cfg = copy.deepcopy(config)
        with torch.device("meta"):
            if model_class is not None:  # the class's own constructor, in build_dtype; then eager attention
                default = torch.get_default_dtype()
                torch.set_default_dtype(build_dtype)
                try:
                    model = model_class(cfg)
                finally:
                    torch.set_default_dtype(default)
                model.set_attn_implementation("eager")
            else:
                model = AutoModelForCausalLM.from_config(cfg, dtype=build_dtype, attn_implementation="eager")
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device="meta"), cache=cache, use_cache=True,
                  logits_to_keep=1)
        return cache

    try:
        try:
            cache = measure(dtype)
        except Exception:
            if dtype == torch.bfloat16:
                raise
            cache = measure(torch.bfloat16)
    except Exception as err:  # any architecture whose forward does not fill a plain DynamicCache
        raise ValueError(f"cannot measure the KV cache of {type(config).__name__} ({config.model_type}): "
                         f"{type(err).__name__}: {err}. The latent trace needs a causal LM whose every layer "
                         "keeps a key/value cache (transformers' DynamicCache)") from err
    shapes = [(layer.keys.shape[1], layer.keys.shape[-1], layer.values.shape[-1])
              for layer in cache.layers if getattr(layer, "keys", None) is not None and layer.keys.numel() > 0]
    if not shapes:
        raise ValueError(f"{type(config).__name__} filled no key/value cache; the latent trace cannot be held")
    if key is not None:
        if len(_SHAPES) >= 32:
            _SHAPES.clear()
        _SHAPES[key] = tuple(shapes)
    return shapes


def _shapes_bytes(shapes: list[tuple[int, int, int]], dtype: torch.dtype) -> int:
    """Bytes per position of one row for ``cache_shapes``' layers: kv_heads x (key_dim + value_dim) each."""
    return sum(heads * (k + v) for heads, k, v in shapes) * dtype.itemsize


def _unwrap(model):
    """The ``PreTrainedModel`` inside PEFT, DDP or FSDP wrappers (its class and config are the model's)."""
    seen = set()
    while not isinstance(model, PreTrainedModel) and id(model) not in seen:
        seen.add(id(model))
        inner = model.get_base_model() if hasattr(model, "get_base_model") else getattr(model, "module", None)
        if inner is None:
            break
        model = inner
    return model


def _float(dtype: torch.dtype) -> torch.dtype:
    """A dtype a model can be built in (a quantized model's parameters may be integers): shapes only."""
    return dtype if dtype.is_floating_point else torch.bfloat16


def bytes_per_position(config_or_model, dtype: torch.dtype | str | None = None) -> int:
    """KV-cache bytes one row of the trace holds per position: the package's one memory estimate.

    ``config_or_model``: a config (``diffmas-eval memory``, from config.json only) or a loaded model
    (``RowCost``: its own class is measured, so remote code and multimodal wrappers count as they run).
    ``dtype``: the cache's dtype (a torch dtype or ``bfloat16``/``float16``/``float32``); for a model,
    default its parameters' dtype (what the chain's trace is stored in).
    """
    if isinstance(dtype, str):
        dtype = torch_dtype(dtype, TRACE_DTYPES)
    if isinstance(config_or_model, torch.nn.Module):
        model = _unwrap(config_or_model)
        if dtype is None:
            dtype = next(config_or_model.parameters()).dtype

        if isinstance(model, PreTrainedModel):
            shapes = cache_shapes(model.config, _float(dtype), type(model))
        else:
            shapes = cache_shapes(config_or_model.config.get_text_config(), _float(dtype))
    else:
        if dtype is None:
            raise ValueError("bytes_per_position(config): pass the dtype the trace is stored in")
        shapes = cache_shapes(config_or_model, _float(dtype))
    return _shapes_bytes(shapes, dtype)


def trace_memory(model: str, agents: int = 4, latent_steps: int = 10, prompt_tokens: int | list[int] = 200,
                 final_tokens: int = 0, dtype: str = "bfloat16", config=None) -> TraceMemory:
    """Bytes of one question's trace (``trace=concat``): the upstream agents' prompts and latent steps.

    ``prompt_tokens``: one count for every upstream agent, or one per upstream agent (``agents - 1``).
    ``final_tokens``: the final agent's prompt plus answer, added on top of the trace in stage 2.
    """
    trace_dtype = torch_dtype(dtype, TRACE_DTYPES)
    if agents < 1 or latent_steps < 0 or final_tokens < 0:
        raise ValueError("need agents >= 1, latent_steps >= 0 and final_tokens >= 0")
    upstream = agents - 1
    prompts = [prompt_tokens] * upstream if isinstance(prompt_tokens, int) else list(prompt_tokens)
    if len(prompts) != upstream or any(p < 1 for p in prompts):
        raise ValueError(f"prompt_tokens: give one count >= 1, or one per upstream agent ({upstream})")
    config = config if config is not None else load_text_config(model)
    shapes = cache_shapes(config, trace_dtype)  # for the table of layer shapes (measured once, then remembered)
    per_position = bytes_per_position(config, trace_dtype)
    positions = trace_positions(prompts, latent_steps)
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
