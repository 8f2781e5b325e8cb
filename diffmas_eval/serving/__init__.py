"""Talking to servers: one OpenAI-compatible client (``client.py``), the DiffMAS final agent decoding on a vLLM
server from the trace's prompt embeddings (``serving/stage2_vllm.py``), and a CPU vLLM for tests and benchmarks
(``vllm_cpu.py``)."""

from .client import BackendError, Completion, OpenAIClient, cut_at_stop

__all__ = ["BackendError", "Completion", "OpenAIClient", "cut_at_stop"]
