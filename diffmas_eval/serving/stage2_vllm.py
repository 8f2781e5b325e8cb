"""Stage 2 on a stock vLLM server: the concatenated trace sent as prompt embeddings.

vLLM returns no hidden states, so stage 1 (the latent steps) stays in transformers; but a
concatenated trace is one causal sequence of input embeddings: row i's trace is exactly
[agent 1's prompt-token embeddings, agent 1's latent vectors, agent 2's prompt ..., then the final
agent's prompt] at positions 0..N-1 (``latent/trace.py``: positions count real tokens). A server
started with ``vllm serve MODEL --enable-prompt-embeds`` decodes from such a sequence unpatched: the
final agent's answer is one ``/v1/completions`` request whose ``prompt_embeds`` is that ``[N, hidden]``
tensor, ``torch.save``-d and base64-encoded (vLLM's documented encoding; its server decodes it with
``torch.load(..., weights_only=True)``, accepts float32/bfloat16/float16 and a 2-D tensor).

The request carries no text prompt: vLLM serves a text prompt sent beside ``prompt_embeds`` as a
second prompt of its own (an empty one is refused as "The decoder prompt cannot be empty" when the
tokenizer adds no BOS, as Llama-3/Qwen/SmolLM2 tokenizers do).

The ``overwrite`` trace is not one causal sequence (its keys were computed over segments it then
dropped), so it cannot be replayed from embeddings: refused. vLLM refuses ``prompt_logprobs`` with
prompt embeddings, so log-likelihood requests are scored in process (the model is loaded for stage 1
anyway) and only decoding goes to the server.

Before any answer, ``PromptEmbedsBackend.preflight`` measures what the server does with embeddings
instead of trusting a per-family table: it asks for the first token's top log-probabilities of a short
prompt sent as token ids (the server embeds them itself) and sent as the chain's own embeddings, and
keeps the scale under which the two agree. vLLM 0.32 feeds ``inputs_embeds`` unscaled for Gemma, Gemma 2
and Gemma 3 (it applies sqrt(hidden) only when it embeds token ids, as transformers' embedding module
does), so the scale is 1 there; older vLLM releases multiplied Gemma/Gemma 2 ``inputs_embeds`` by it, which
the measurement catches (the request then carries the embeddings divided by it). The same probe turns a
server without ``--enable-prompt-embeds``, a served model of another hidden size, a name the server does
not serve, and a served model that is not the chain's (another checkpoint, a LoRA not applied) into
errors that name the fix, before anything is written.
"""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass, replace

import torch

from ..latent.realign import embedding_scale
from ..latent.trace import LatentTrace
from .client import BackendError, Completion, OpenAIClient, cut_at_stop

log = logging.getLogger(__name__)
PROBE_TEXT = "The capital of France is"  # any short prompt: the preflight compares next-token distributions


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
    if bool((trace.next_pos != trace.mask.sum(-1)).any()):  # positions restarted per segment
        raise ValueError("a stitched or hierarchical trace (trace=stitch, topology=hierarchical) is not one causal "
                         "sequence of input embeddings (each segment was built apart, from position 0); it cannot "
                         "be sent to vLLM: use trace=concat, or stage2=hf")
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


@dataclass
class Sampling:
    """The final agent's decoding: greedy unless ``do_sample``."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # sampled: the request's seed (``client.request_seeds``), for a reproducible answer

    def payload(self) -> dict:
        if not self.do_sample:
            return {"temperature": 0.0}
        out: dict = {"temperature": self.temperature, "top_p": self.top_p}
        if self.seed is not None:
            out["seed"] = self.seed
        if self.top_k > 0:
            out["extra_body"] = {"top_k": self.top_k}  # a vLLM extension of the completions API
        return out


def _max_gap(a: dict[int, float], b: dict[int, float]) -> float:
    """How far two top-k next-token distributions are apart: the largest log-probability difference over
    the tokens both list (inf if they share none)."""
    shared = set(a) & set(b)
    return max((abs(a[t] - b[t]) for t in shared), default=float("inf"))


class PromptEmbedsBackend(OpenAIClient):
    """``/v1/completions`` with ``prompt_embeds`` on a ``vllm serve --enable-prompt-embeds`` server.

    The client, its timeout, bounded retries and errors naming the URL are ``serving.OpenAIClient``'s;
    ``model`` is the served name (the model, or a LoRA module's name)."""

    name = "vllm"
    embed_scale = 1.0  # measured by ``preflight``: the request carries embeddings / embed_scale
    tokenizer = None  # set by ``preflight``: answers are decoded here from the server's token ids
    eos: frozenset[int] = frozenset()

    def _explain(self, err: BackendError) -> BackendError:
        """vLLM's refusals of prompt embeddings, said as what to change."""
        text = str(err)
        if "enable-prompt-embeds" in text or "enable_prompt_embeds" in text:
            return BackendError(f"{self._where()} was started without --enable-prompt-embeds, which stage2=vllm "
                                "needs: restart it as `vllm serve MODEL --enable-prompt-embeds` (see docs/vllm.md, "
                                f"'DiffMAS stage 2 on vLLM').\n{text}")
        if "hidden_size" in text:
            return BackendError(f"{self._where()} serves a model whose hidden size is not the chain's: serve the "
                                f"chain's own model (pretrained=) or point base_url= at a server that does.\n{text}")
        return BackendError(f"{text}\n(stage2=vllm needs `vllm serve MODEL --enable-prompt-embeds`; see docs/vllm.md, "
                            "'DiffMAS stage 2 on vLLM')")

    def complete_embeds(self, embeds: torch.Tensor, max_tokens: int, stop: list[str] | None = None,
                        sampling: Sampling | None = None, **extra) -> Completion:
        """One answer. With a tokenizer (after ``preflight``) the text is decoded here from the token ids the
        server generated, as the in-process chain decodes its own (EOS dropped, special tokens skipped, cut at
        the first stop string): vLLM's detokenizer holds back a trailing partial UTF-8 character, which the
        in-process decode writes as U+FFFD, so decoding on the server would make the two differ there."""
        payload = (sampling or Sampling()).payload()
        body = {**payload.pop("extra_body", {}), **extra.pop("extra_body", {})}
        body["prompt_embeds"] = encode_prompt_embeds(embeds if self.embed_scale == 1.0 else embeds / self.embed_scale)
        if self.tokenizer is not None:
            payload["logprobs"] = 0  # the sampled tokens (and their log-probabilities), as ids
            body["return_tokens_as_token_ids"] = True
        try:
            out, resp = self.complete_with_response(None, max_tokens, stop, extra_body=body, **payload, **extra)
        except BackendError as err:
            raise self._explain(err) from err
        if self.tokenizer is None:
            return out
        try:
            tokens = resp.choices[0].logprobs.tokens
            ids = [int(t.removeprefix("token_id:")) for t in tokens]
        except (AttributeError, IndexError, TypeError, ValueError) as err:
            raise BackendError(f"{self._where()} returned no token ids (logprobs=0, return_tokens_as_token_ids)"
                               ) from err
        ids = [t for t in ids if t not in self.eos]
        text = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), stop)  # it skips empty strings
        return Completion(text, out.tokens, out.finish_reason, out.logprobs, out.token_texts, out.stop_reason)

    def generate_embeds(self, rows: list[torch.Tensor], max_tokens: int, stop: list[str] | None = None,
                        sampling: Sampling | None = None,
                        seeds: list[int | None] | None = None) -> list[Completion]:
        """One request per row, ``num_concurrent`` in flight, answers in row order; ``seeds``: each row's seed
        (sampled decoding)."""
        sampling = sampling or Sampling()
        per_row = [replace(sampling, seed=s) for s in (seeds or [sampling.seed] * len(rows))]
        return self.map(lambda pair: self.complete_embeds(pair[0], max_tokens, stop, pair[1]),
                        list(zip(rows, per_row)))

    @torch.no_grad()
    def preflight(self, model, tokenizer, tolerance: float | None = None, eos: set[int] | None = None) -> float:
        """Check the server can decode this chain's embeddings and measure the scale it applies to them.

        Three one-token requests: the probe prompt as token ids (the server's own embedding), as the chain's
        embeddings (``model.get_input_embeddings()``, scale included), and as those divided by the
        embedding module's measured scale. The first agreeing within ``tolerance`` (log-probability; by default
        1e-3 for float32, 0.25 for 16-bit weights, where kernels round differently) sets ``embed_scale``. The
        server's answer is then compared with ``model`` in process, so a served name that is another
        checkpoint, or a LoRA the server does not apply, is an error too."""
        served = self.served_models()
        if self.model not in served:
            raise BackendError(f"{self._where()} does not serve {self.model!r}; it serves {served}. Pass "
                               "served_model=<one of those>, or, for a trained chain (peft=DIR), start vLLM with "
                               "--enable-lora --lora-modules NAME=DIR and pass served_model=NAME")
        embed = model.get_input_embeddings()
        tol = tolerance if tolerance is not None else (1e-3 if embed.weight.dtype == torch.float32 else 0.25)
        ids = tokenizer(PROBE_TEXT, add_special_tokens=True)["input_ids"]
        by_ids = self.next_token_logprobs(ids)
        vectors = embed(torch.tensor(ids, device=embed.weight.device))
        gaps = {}
        for scale in dict.fromkeys([1.0, embedding_scale(embed)]):
            self.embed_scale = scale
            try:
                by_embeds = self._embeds_logprobs(vectors)
            except BackendError as err:
                raise self._explain(err) from err
            gaps[scale] = _max_gap(by_ids, by_embeds)
            if gaps[scale] <= tol:
                break
        else:
            self.embed_scale = 1.0
            raise BackendError(f"{self._where()} reads prompt embeddings differently from token ids: the next-token "
                               f"log-probabilities of {PROBE_TEXT!r} differ by {gaps} (embedding scale: gap) beyond "
                               f"{tol}; this vLLM version treats inputs_embeds in a way stage2=vllm does not know")
        logits = model(input_ids=torch.tensor([ids], device=embed.weight.device)).logits[0, -1].float()
        ours = torch.log_softmax(logits, -1)
        local = {int(t): float(ours[t]) for t in ours.topk(len(by_ids)).indices}
        gap = _max_gap(by_ids, local)
        self.probe_gaps = {**gaps, "in_process": gap}
        if gap > tol:
            raise BackendError(f"{self._where()} is not the chain's model: its next-token log-probabilities for "
                               f"{PROBE_TEXT!r} differ from the model in process by {gap:.3g} (> {tol}). Serve the "
                               "same checkpoint (pretrained=), and for peft=DIR the same adapter under "
                               "served_model= (--lora-modules NAME=DIR)")
        self.tokenizer, self.eos = tokenizer, frozenset(eos or {tokenizer.eos_token_id} - {None})
        log.info("stage2=vllm: %s decodes the chain's embeddings (embedding scale %s, probe gap %.2e)",
                 self._where(), self.embed_scale, gaps[self.embed_scale])
        return self.embed_scale

    def _embeds_logprobs(self, vectors: torch.Tensor, k: int = 5) -> dict[int, float]:
        body = {"prompt_embeds": encode_prompt_embeds(vectors / self.embed_scale)}
        return self.next_token_logprobs(None, k, extra_body=body)
