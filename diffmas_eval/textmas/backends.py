"""Where a text agent's words come from: an in-process transformers model or an OpenAI-compatible server.

Both take fully formatted prompt strings (the chat template is applied on the client, by the same
tokenizer, so both backends see the same text) and decode greedily unless told otherwise.

``OpenAIBackend`` talks to ``/v1/completions`` of any OpenAI-compatible server (``vllm serve``,
``transformers serve``) with the ``openai`` client: its own ``timeout`` and ``max_retries`` (with
backoff), ``num_concurrent`` requests in flight through a thread pool. A server that is down, too
slow or answers something that is not a completion ends in ``BackendError`` naming the URL.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch


class BackendError(RuntimeError):
    """The text backend could not produce a completion (server down, timeout, malformed answer)."""


@dataclass
class Completion:
    text: str
    tokens: int | None  # generated tokens (None: the server did not say)


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """lm-eval's convention: the text before the first occurrence of any stop string."""
    for s in stop or []:
        if s:
            text = text.split(s)[0]
    return text


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
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        eos.discard(None)
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


class OpenAIBackend:
    """``/v1/completions`` of an OpenAI-compatible server, ``num_concurrent`` requests at a time."""

    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                 max_retries: int = 2, num_concurrent: int = 4):
        import openai

        self.base_url, self.model = base_url.rstrip("/"), model
        self.timeout, self.max_retries, self.num_concurrent = float(timeout), int(max_retries), max(1, num_concurrent)
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key or "EMPTY", timeout=self.timeout,
                                    max_retries=self.max_retries)

    def _where(self) -> str:
        return f"the OpenAI-compatible server at {self.base_url} (model {self.model!r})"

    def _call(self, **payload):
        import openai

        try:
            return self.client.completions.create(model=self.model, **payload)
        except openai.APITimeoutError as err:
            raise BackendError(f"{self._where()} did not answer within timeout={self.timeout}s "
                               f"(after {self.max_retries} retries): {err}") from err
        except openai.APIConnectionError as err:
            raise BackendError(f"cannot reach {self._where()} (timeout={self.timeout}s, {self.max_retries} "
                               f"retries): {err}. Is the server running? (see README: vllm serve / "
                               "transformers serve)") from err
        except openai.APIStatusError as err:
            raise BackendError(f"{self._where()} answered HTTP {err.status_code}: {str(err)[:500]}") from err
        except openai.APIError as err:  # e.g. a body that is not a completion
            raise BackendError(f"{self._where()} returned an invalid response: {str(err)[:500]}") from err

    def _complete(self, prompt: str, max_tokens: int, stop: list[str] | None) -> Completion:
        payload = {"prompt": prompt, "max_tokens": int(max_tokens), "temperature": 0.0}
        if stop:
            payload["stop"] = list(stop)
        resp = self._call(**payload)
        choices = getattr(resp, "choices", None)
        text = getattr(choices[0], "text", None) if isinstance(choices, list) and choices else None
        if not isinstance(text, str):
            raise BackendError(f"{self._where()} returned something that is not a completion: {str(resp)[:300]}")
        usage = getattr(resp, "usage", None)
        tokens = getattr(usage, "completion_tokens", None)
        return Completion(cut_at_stop(text, stop), tokens if isinstance(tokens, int) else None)

    def generate(self, prompts: list[str], max_tokens: int, stop: list[str] | None = None) -> list[Completion]:
        if len(prompts) <= 1 or self.num_concurrent == 1:
            return [self._complete(p, max_tokens, stop) for p in prompts]
        with ThreadPoolExecutor(min(self.num_concurrent, len(prompts))) as pool:
            return list(pool.map(lambda p: self._complete(p, max_tokens, stop), prompts))

    def prompt_logprobs(self, token_ids: list[int]) -> list[tuple[float | None, bool]]:
        """Per prompt token: its log-probability and whether it was the top choice (echo + logprobs).

        vLLM answers this (``echo=True, logprobs=1, max_tokens=1`` with a token-id prompt, as lm-eval's
        ``local-completions`` asks); ``transformers serve`` does not implement echo/logprobs."""
        hint = ("loglikelihood with backend=openai needs a server that implements echo=True with logprobs for a "
                "token-id prompt on /v1/completions (vLLM does, transformers serve does not)")
        try:
            resp = self._call(prompt=token_ids, max_tokens=1, temperature=0.0, echo=True, logprobs=1)
        except BackendError as err:
            raise BackendError(f"{err}\n{hint}") from err
        try:
            lp = resp.choices[0].logprobs
            values = lp.token_logprobs[:len(token_ids)]
            tops = lp.top_logprobs[:len(token_ids)]
            tokens = lp.tokens[:len(token_ids)]
        except (AttributeError, IndexError, TypeError) as err:
            raise BackendError(f"{self._where()} returned no prompt log-probabilities; {hint}") from err
        out = []
        for value, top, tok in zip(values, tops or [None] * len(values), tokens):
            greedy = bool(top) and max(top, key=top.get) == tok
            out.append((value, greedy))
        return out
