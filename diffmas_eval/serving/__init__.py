"""Talking to servers: one OpenAI-compatible client (``client.py``) and a CPU vLLM for tests and benchmarks
(``vllm_cpu.py``)."""

from .client import BackendError, Completion, OpenAIClient, cut_at_stop

__all__ = ["BackendError", "Completion", "OpenAIClient", "cut_at_stop"]
