"""One client for every OpenAI-compatible server this package talks to (``vllm serve``, ``transformers serve``).

``OpenAIClient`` owns what every caller needs once: the ``openai`` client with its own ``timeout`` and
``max_retries`` (with backoff), errors that name the URL and the model (``BackendError``), ``num_concurrent``
requests in flight (``map``), parsing a ``/v1/completions`` answer into one result type (``Completion``),
and the served model names. Text prompts (``textmas backend=openai``) and prompt embeddings
(``diffmas stage2=vllm``, ``stage2_vllm.py``) are two payloads of the same ``complete`` call.

``cut_at_stop`` (``stopping.py``, re-exported here) is lm-eval's stop convention, used by the servers' answers
and the in-process chain alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from ..extras import require
from ..stopping import cut_at_stop  # noqa: F401  (re-exported: the servers' answers are cut by it)

# the OpenAI completions API (and vLLM, which validates it) takes at most 4 stop strings; the rest are cut on
# the client (``cut_at_stop``), which gives the same text: the server just stops later
MAX_SERVER_STOPS = 4
# the client's defaults, which every model_arg that sets them (``client_options``) names
TIMEOUT_S, MAX_RETRIES, NUM_CONCURRENT = 120.0, 2, 4
T = TypeVar("T")
R = TypeVar("R")


def client_options(when: str) -> dict[str, str]:
    """The model_args that configure the client, one help line each (the lm-eval models' ``OPTIONS``), for the
    ``textmas`` and ``diffmas`` models alike; ``when``: the setting they apply under (``backend=openai``)."""
    return {"base_url": f"{when}: the server's OpenAI API root, e.g. http://127.0.0.1:8000/v1",
            "timeout": f"{when}: seconds per request attempt (default {TIMEOUT_S:g})",
            "max_retries": f"{when}: retries after a failed attempt, with backoff (default {MAX_RETRIES})",
            "num_concurrent": f"{when}: requests in flight (default {NUM_CONCURRENT})"}


class BackendError(RuntimeError):
    """A server could not produce a completion (down, too slow, refused the request, malformed answer)."""


@dataclass
class Completion:
    text: str
    tokens: int | None  # generated tokens (None: the server did not say)
    finish_reason: str | None = None  # "stop" (EOS or a stop string) | "length" (the token cap); None: unknown
    # asked with logprobs=0 (vLLM): each generated token's log-probability and its text, and what stopped it
    # (vLLM's ``stop_reason``: the stop string, a stop token id, or None for EOS); None where the server gave none
    logprobs: list[float] | None = None
    token_texts: list[str] | None = None
    stop_reason: str | int | None = None


class OpenAIClient:
    """``/v1/completions`` and ``/v1/models`` of one OpenAI-compatible server, for one served model name."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = TIMEOUT_S,
                 max_retries: int = MAX_RETRIES, num_concurrent: int = NUM_CONCURRENT):
        openai = require("openai")

        self.base_url, self.model = base_url.rstrip("/"), model
        self.timeout, self.max_retries, self.num_concurrent = float(timeout), int(max_retries), max(1, num_concurrent)
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key or "EMPTY", timeout=self.timeout,
                                    max_retries=self.max_retries)

    def _where(self) -> str:
        return f"the OpenAI-compatible server at {self.base_url} (model {self.model!r})"

    def _guard(self, call: Callable[[], R]) -> R:
        """Every failure of the ``openai`` client as one ``BackendError`` that names the URL and what to do."""
        openai = require("openai")

        try:
            return call()
        except openai.APITimeoutError as err:
            raise BackendError(f"{self._where()} did not answer within timeout={self.timeout}s "
                               f"(after {self.max_retries} retries): {err}") from err
        except openai.APIConnectionError as err:
            raise BackendError(f"cannot reach {self._where()} (timeout={self.timeout}s, {self.max_retries} "
                               f"retries): {err}. Is the server running? (see docs/vllm.md and docs/textmas.md: vllm "
                               "serve / transformers serve)") from err
        except openai.APIStatusError as err:
            raise BackendError(f"{self._where()} answered HTTP {err.status_code}: {str(err)[:500]}") from err
        except openai.APIError as err:  # e.g. a body that is not a completion
            raise BackendError(f"{self._where()} returned an invalid response: {str(err)[:500]}") from err

    def _call(self, **payload):
        return self._guard(lambda: self.client.completions.create(model=self.model, **payload))

    def served_models(self) -> list[str]:
        """The names the server answers to (a vLLM server: the model and each ``--lora-modules`` name)."""
        return [m.id for m in self._guard(lambda: list(self.client.models.list()))]

    def complete(self, prompt: str | list[int] | None, max_tokens: int, stop: list[str] | None = None,
                 **payload) -> Completion:
        """One completion; ``prompt=None`` sends no prompt (the request carries ``prompt_embeds`` instead)."""
        return self.complete_with_response(prompt, max_tokens, stop, **payload)[0]

    def complete_with_response(self, prompt: str | list[int] | None, max_tokens: int,
                               stop: list[str] | None = None, **payload) -> tuple[Completion, object]:
        """``complete``, and the server's whole answer (for a caller that asked for more, e.g. logprobs)."""
        stop = [s for s in (stop or []) if s]
        if stop:
            payload["stop"] = stop[:MAX_SERVER_STOPS]
        payload.setdefault("temperature", 0.0)
        resp = self._call(prompt=prompt, max_tokens=int(max_tokens), **payload)
        return self._completion(resp, stop), resp

    def _completion(self, resp, stop: list[str]) -> Completion:
        choices = getattr(resp, "choices", None)
        choice = choices[0] if isinstance(choices, list) and choices else None
        text = getattr(choice, "text", None)
        if not isinstance(text, str):
            raise BackendError(f"{self._where()} returned something that is not a completion: {str(resp)[:300]}")
        tokens = getattr(getattr(resp, "usage", None), "completion_tokens", None)
        reason = getattr(choice, "finish_reason", None)
        lp = getattr(choice, "logprobs", None)
        values, texts = getattr(lp, "token_logprobs", None), getattr(lp, "tokens", None)
        if not (isinstance(values, list) and all(isinstance(v, (int, float)) for v in values)
                and isinstance(texts, list) and len(texts) == len(values)):
            values = texts = None  # not asked, or a server that does not return them
        stop_reason = getattr(choice, "stop_reason", None)
        return Completion(cut_at_stop(text, stop), tokens if isinstance(tokens, int) else None,
                          reason if isinstance(reason, str) else None, values, texts,
                          stop_reason if isinstance(stop_reason, (str, int)) else None)

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``fn`` over ``items`` with ``num_concurrent`` in flight, results in order."""
        items = list(items)
        if len(items) <= 1 or self.num_concurrent == 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(min(self.num_concurrent, len(items))) as pool:
            return list(pool.map(fn, items))

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

    def next_token_logprobs(self, prompt: str | list[int] | None, k: int = 5,
                            extra_body: dict | None = None) -> dict[int, float]:
        """Token id -> log-probability of the first generated token's top ``k`` (a one-token greedy completion;
        ids, not strings, since several tokens can decode to the same text: vLLM's ``return_tokens_as_token_ids``)."""
        body = {**(extra_body or {}), "return_tokens_as_token_ids": True}
        resp = self._call(prompt=prompt, max_tokens=1, temperature=0.0, logprobs=k, extra_body=body)
        try:
            top = resp.choices[0].logprobs.top_logprobs[0]
            return {int(key.removeprefix("token_id:")): float(v) for key, v in top.items()}
        except (AttributeError, IndexError, TypeError, ValueError) as err:
            raise BackendError(f"{self._where()} returned no token-id log-probabilities for logprobs={k} "
                               "(return_tokens_as_token_ids; vLLM answers it)") from err


def request_seeds(seed: int | None, keys: list[str]) -> list[int | None]:
    """A sampled request's seed on a server (the completions API's ``seed``), so a served cell is reproducible: from
    the run's ``seed``, the request's prompt and how many times that prompt came before it in ``keys`` (lm-eval's
    ``repeats: k`` sends one prompt k times in a row; each sample gets its own seed). The same run asks the same
    seeds whatever the order, concurrency or batching; ``seed=None``: no seed (the server's own randomness)."""
    if seed is None:
        return [None] * len(keys)
    seen: dict[str, int] = {}
    out = []
    for key in keys:
        k = seen[key] = seen.get(key, -1) + 1
        digest = hashlib.sha256(f"{seed}\0{k}\0{key}".encode()).digest()
        out.append(int.from_bytes(digest[:4], "little") & 0x7FFFFFFF)
    return out
