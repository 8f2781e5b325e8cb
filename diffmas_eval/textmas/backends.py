"""Where a text agent's words come from: an in-process transformers model or an OpenAI-compatible server.

Both take fully formatted prompt strings (the chat template is applied on the client, by the same
tokenizer, so both backends see the same text) and decode greedily unless told otherwise.

``OpenAIBackend`` sends them to ``/v1/completions`` of any OpenAI-compatible server (``vllm serve``,
``transformers serve``) through the package's one client (``serving/client.py``: timeouts, bounded
retries, concurrency, errors naming the URL).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..serving.client import BackendError, Completion, OpenAIClient, cut_at_stop
from ..stopping import eos_ids

__all__ = ["BackendError", "Completion", "HFBackend", "OpenAIBackend", "cut_at_stop"]


class HFBackend:
    """Batched greedy (or sampled) decoding with ``model.generate``; prompts are left-padded."""

    name = "hf"

    def __init__(self, model, tokenizer, encode: Callable[[str], list[int]], batch_size: int = 1):
        self.model, self.tokenizer, self.encode, self.batch_size = model, tokenizer, encode, max(1, batch_size)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @torch.no_grad()
    def generate(self, prompts: list[str], max_tokens: int, stop: list[str] | None = None) -> list[Completion]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = eos_ids(self.model, self.tokenizer)
        ids = [self.encode(p) for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths share a batch
        out: list[Completion | None] = [None] * len(ids)
        for b0 in range(0, len(order), self.batch_size):
            batch = order[b0:b0 + self.batch_size]
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in batch], device=self.device)
            mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in batch],
                                device=self.device)
            gen = self.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_tokens,
                                      do_sample=False, pad_token_id=pad, eos_token_id=sorted(eos))
            for row, i in enumerate(batch):
                new = gen[row, width:].tolist()
                kept = []
                for tok in new:
                    if tok in eos:
                        kept.append(tok)
                        break
                    kept.append(tok)
                text = self.tokenizer.decode([t for t in kept if t not in eos], skip_special_tokens=True)
                out[i] = Completion(cut_at_stop(text, stop), len(kept))
        return out


class OpenAIBackend(OpenAIClient):
    """Text prompts on ``/v1/completions`` of an OpenAI-compatible server (``serving.OpenAIClient``),
    ``num_concurrent`` requests at a time."""

    name = "openai"

    def generate(self, prompts: list[str], max_tokens: int, stop: list[str] | None = None,
                 seeds: list[int | None] | None = None, **payload) -> list[Completion]:
        """``payload``: more request fields, e.g. ``logprobs=0`` (vLLM answers it; ``transformers serve``
        accepts and ignores it), or sampling's ``temperature``/``top_p``; ``seeds``: each prompt's ``seed``
        (sampled decoding, ``client.request_seeds``; None: none sent)."""
        def one(pair: tuple[str, int | None]) -> Completion:
            prompt, seed = pair
            return self.complete(prompt, max_tokens, stop, **payload, **({} if seed is None else {"seed": seed}))

        return self.map(one, list(zip(prompts, seeds or [None] * len(prompts))))
