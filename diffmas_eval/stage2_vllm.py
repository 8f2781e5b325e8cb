"""Stage 2 on a stock vLLM server: the concatenated trace sent as prompt embeddings.

vLLM returns no hidden states, so stage 1 (the latent steps) stays in transformers; but a
concatenated trace is one causal sequence of input embeddings: row i's trace is exactly
[agent 1's prompt-token embeddings, agent 1's latent vectors, agent 2's prompt ..., then the final
agent's prompt] at positions 0..N-1 (``latent/trace.py``: positions count real tokens). A server
started with ``vllm serve MODEL --enable-prompt-embeds`` decodes from such a sequence unpatched: the
final agent's answer is one ``/v1/completions`` request whose ``prompt_embeds`` is that ``[N, hidden]``
tensor, ``torch.save``-d and base64-encoded (vLLM's documented encoding; its server decodes it with
``torch.load(..., weights_only=True)``, accepts float32/bfloat16/float16 and a 2-D tensor).

The ``overwrite`` trace is not one causal sequence (its keys were computed over segments it then
dropped), so it cannot be replayed from embeddings: refused. vLLM refuses ``prompt_logprobs`` with
prompt embeddings, so log-likelihoods stay in process (``stage2=hf``).

Gemma: transformers 5.x puts sqrt(hidden) in the embedding module (``get_input_embeddings`` output is
already scaled) and never rescales ``inputs_embeds``; vLLM's Gemma 3 does the same, but its Gemma and
Gemma 2 multiply ``inputs_embeds`` by the normalizer in ``forward``. ``server_embed_scale`` is that
factor; the request carries the embeddings divided by it, so the server's model sees what the
in-process chain feeds.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .latent.trace import LatentTrace
from .textmas.backends import BackendError, Completion, OpenAIBackend, cut_at_stop

# model types whose vLLM implementation multiplies inputs_embeds by sqrt(hidden_size) (models/gemma.py, gemma2.py)
RESCALES_PROMPT_EMBEDS = ("gemma", "gemma2")


def server_embed_scale(model) -> float:
    """The factor vLLM's implementation of this architecture applies to prompt embeddings (1 for most)."""
    config = model.config.get_text_config()
    if getattr(config, "model_type", None) in RESCALES_PROMPT_EMBEDS:
        return float(config.hidden_size) ** 0.5
    return 1.0


@torch.no_grad()
def trace_embeddings(model, trace: LatentTrace, finals: list[list[int]]) -> list[torch.Tensor]:
    """Per row, the ``[N, hidden]`` input embeddings of its trace followed by the final agent's prompt.

    ``trace`` must come from ``AgentChain.stage1(..., record_inputs=True)`` in ``concat`` mode: prompt
    tokens go through ``model.get_input_embeddings()`` (which includes any scale, e.g. Gemma's),
    latent vectors are the realigned vectors the chain fed. Fed to the model as ``inputs_embeds`` at
    positions 0..N-1 with no cache, it gives the chain's final-agent logits.
    """
    if len(finals) != trace.batch:
        raise ValueError(f"{len(finals)} final prompts for a trace of {trace.batch} rows")
    if len(trace.history) != len(trace.segments):
        raise ValueError("an overwrite trace (trace=overwrite) is not one causal sequence of input embeddings; "
                         "it cannot be sent to vLLM: use trace=concat, or stage2=hf")
    if any(s.prompt_ids is None or (s.latent and s.latents is None) for s in trace.segments):
        raise ValueError("the trace has no recorded inputs: run chain.stage1(questions, record_inputs=True)")
    embed = model.get_input_embeddings()
    dtype, device = embed.weight.dtype, embed.weight.device
    rows = []
    for i, final in enumerate(finals):
        parts = []
        for seg in trace.segments:
            parts.append(embed(torch.tensor(seg.prompt_ids[i], dtype=torch.long, device=device)))
            if seg.latent:
                parts.append(seg.latents[i])
        parts.append(embed(torch.tensor(final, dtype=torch.long, device=device)))
        rows.append(torch.cat([p.to(dtype) for p in parts]))
    return rows


def encode_prompt_embeds(embeds: torch.Tensor) -> str:
    """vLLM's prompt-embeds encoding: ``torch.save`` of a 2-D float tensor, base64 (a fresh CPU copy,
    since ``torch.save`` of a view would write its whole storage)."""
    if embeds.dim() != 2:
        raise ValueError(f"prompt embeddings must be [tokens, hidden], got shape {tuple(embeds.shape)}")
    if embeds.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"vLLM takes float32, bfloat16 or float16 prompt embeddings, not {embeds.dtype}")
    buf = io.BytesIO()
    torch.save(embeds.detach().to("cpu", copy=True).contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_prompt_embeds(data: str | bytes) -> torch.Tensor:
    """What vLLM's server does with ``prompt_embeds`` (for tests and debugging)."""
    tensor = torch.load(io.BytesIO(base64.b64decode(data, validate=True)), weights_only=True,
                        map_location="cpu")
    if not isinstance(tensor, torch.Tensor) or tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError("prompt_embeds is not a float32/bfloat16/float16 tensor")
    tensor = tensor.to_dense()
    return tensor.squeeze(0) if tensor.dim() > 2 else tensor


@dataclass
class Sampling:
    """The final agent's decoding: greedy unless ``do_sample``."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def payload(self) -> dict:
        if not self.do_sample:
            return {"temperature": 0.0}
        out: dict = {"temperature": self.temperature, "top_p": self.top_p}
        if self.top_k > 0:
            out["extra_body"] = {"top_k": self.top_k}  # a vLLM extension of the completions API
        return out


class PromptEmbedsBackend(OpenAIBackend):
    """``/v1/completions`` with ``prompt_embeds`` on a ``vllm serve --enable-prompt-embeds`` server.

    The OpenAI client, its timeout, bounded retries with backoff and the errors naming the URL are
    ``OpenAIBackend``'s; ``model`` is the served name (the model, or a LoRA module's name)."""

    name = "vllm"
    embed_scale = 1.0  # ``server_embed_scale`` of the model: the request carries embeddings / embed_scale

    def complete(self, embeds: torch.Tensor, max_tokens: int, stop: list[str] | None = None,
                 sampling: Sampling | None = None) -> Completion:
        payload = (sampling or Sampling()).payload()
        extra = payload.pop("extra_body", {})
        extra["prompt_embeds"] = encode_prompt_embeds(embeds if self.embed_scale == 1.0 else embeds / self.embed_scale)
        stop = [s for s in (stop or []) if s]
        if stop:
            payload["stop"] = stop
        try:
            # ``prompt`` is required by the client; vLLM answers the prompt embeddings and ignores an empty prompt
            resp = self._call(prompt="", max_tokens=int(max_tokens), extra_body=extra, **payload)
        except BackendError as err:
            raise BackendError(f"{err}\n(stage2=vllm needs `vllm serve MODEL --enable-prompt-embeds`; see README "
                               "'DiffMAS stage 2 on vLLM')") from err
        choices = getattr(resp, "choices", None)
        text = getattr(choices[0], "text", None) if isinstance(choices, list) and choices else None
        if not isinstance(text, str):
            raise BackendError(f"{self._where()} returned something that is not a completion: {str(resp)[:300]}")
        tokens = getattr(getattr(resp, "usage", None), "completion_tokens", None)
        return Completion(cut_at_stop(text, stop), tokens if isinstance(tokens, int) else None)

    def generate_embeds(self, rows: list[torch.Tensor], max_tokens: int, stop: list[str] | None = None,
                        sampling: Sampling | None = None) -> list[Completion]:
        """One request per row, ``num_concurrent`` in flight, answers in row order."""
        def one(embeds):
            return self.complete(embeds, max_tokens, stop, sampling)

        if len(rows) <= 1 or self.num_concurrent == 1:
            return [one(r) for r in rows]
        with ThreadPoolExecutor(min(self.num_concurrent, len(rows))) as pool:
            return list(pool.map(one, rows))
