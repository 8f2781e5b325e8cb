"""``lm_eval --model textmas``: text multi-agent baselines with DiffMAS's roles and prompts.

Requests are read as ``diffmas`` reads them: upstream agents get the task's bare question (recovered
through the ``apply_chat_template`` override), the final agent gets the task context exactly as the
task formats it, with a note before it; here the note carries the upstream agents' texts. With
``agents=1`` there is no upstream agent and no note: ``backend=hf`` then answers exactly as lm-eval's
``hf`` model (the final agent *is* an ``HFLM``, which the tests use as the oracle).

Backends: ``hf`` (in-process transformers: upstream agents batched through ``model.generate``, the
final agent through ``HFLM``) and ``openai`` (any OpenAI-compatible ``/v1/completions`` server:
``vllm serve``, ``transformers serve``; the chat template is applied here, with the model's own
tokenizer, so both backends send the same text).

With ``backend=hf`` every ``hf`` model_arg works: what is not one of ``OPTIONS`` and is an argument of
``HFLM`` goes to the inner ``HFLM`` unchanged (``common.check_model_args``); with ``backend=openai``
such an argument is an error that says it applies to ``backend=hf``.
"""

from __future__ import annotations

import copy
import os
import time
from collections import defaultdict, deque
from dataclasses import dataclass

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm
from transformers import AutoTokenizer, LogitsProcessorList

from .. import DEFAULT_MODEL
from ..latent.config import chain_options
from ..models import resolve_pretrained
from ..prompts import ROLE_OPTIONS, last_user_turn, resolve_roles
from ..serving.client import MAX_RETRIES, NUM_CONCURRENT, TIMEOUT_S, client_options, request_seeds
from ..stability import AnswerStats, StepRecorder, served_record
from ..stopping import ending, eos_ids, stop_hit
from ..tasks.protocol import check_gen_kwargs
from ..textmas.backends import BackendError, HFBackend, OpenAIBackend
from ..textmas.chain import TextChain, TextTrace
from .common import Accounting, DataParallel, check_model_args, group_by_gen_kwargs

OPTIONS = {
    "pretrained": "hub id, local path or bundled:NAME (backend=hf: the model; backend=openai: its tokenizer "
                  "and, unless model= is given, the served model's name)",
    "backend": "hf | openai",
    "model": "backend=openai: model name sent to the server (default: pretrained; bundled:NAME its local path)",
    "tokenizer": "tokenizer for the chat template (default: pretrained); backend=hf: HFLM's tokenizer",
    "api_key": "backend=openai: API key (default EMPTY; or $OPENAI_API_KEY)",
    "seed": "backend=openai with sampling (do_sample): each request's seed derives from it, its prompt and its "
            "sample index (serving.client.request_seeds), so a sampled served run is reproducible",
    **client_options("backend=openai"),
    # the chain's shape means the same here as in diffmas: its help is the schema's
    **{o.name: o.describe() for o in chain_options() if o.name in ("agents", "topology")},
    "agent_max_tokens": "tokens each upstream agent may write (default 512)",
    **ROLE_OPTIONS,
    "dtype": "backend=hf: auto | float32 | bfloat16 | float16",
    "device": "backend=hf: cuda, cuda:N or cpu (default: cuda if available)",
    "batch_size": "questions per batch (an integer)",
    "max_batch_size": "accepted for lm-eval compatibility",
    "max_length": "backend=hf: model context in tokens",
    "enable_thinking": "passed to the chat template (Qwen3)",
    "trust_remote_code": "passed to from_pretrained",
}


class FinalAgentLM(DataParallel, HFLM):
    """lm-eval's ``hf`` model as the text MAS's final agent: it answers exactly as ``hf`` does, and
    remembers how many tokens it generated for each context (for the accounting) and each answer's
    stability statistics (``stability.StepRecorder`` inside ``model.generate``: no extra forward)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.generated: dict[str, int] = {}
        self.stats: dict[str, deque[AnswerStats]] = defaultdict(deque)  # per context, in decoding order
        self._batch: list[str] = []

    def tok_batch_encode(self, strings: list[str], *args, **kwargs):
        self._batch = list(strings)  # the contexts of the batch _model_generate is about to decode
        return super().tok_batch_encode(strings, *args, **kwargs)

    def _model_generate(self, context, max_length: int, stop: list[str], **kwargs):
        recorder = StepRecorder()
        processors = LogitsProcessorList([*(kwargs.pop("logits_processor", None) or []), recorder])
        out = super()._model_generate(context, max_length, stop, logits_processor=processors, **kwargs)
        logps, ents = recorder.finish(out)
        pad, eos = self.tokenizer.pad_token_id, self._eos_ids()
        steps = out.shape[1] - context.shape[1]
        for text, row, lp, en in zip(self._batch, out[:, context.shape[1]:].tolist(), logps, ents):
            while row and row[-1] == pad:  # finished rows are padded to the batch's longest
                row.pop()
            self.generated[text] = len(row)
            self.stats[text].append(_answer_stats(row, lp, en, steps, eos, stop, self.tok_decode))
        return out

    def _eos_ids(self) -> set[int]:
        """``stopping.eos_ids`` and lm-eval's end-of-text id (what HFLM itself stops at)."""
        return eos_ids(self.model, self.tokenizer) | ({self.eot_token_id} - {None})


def _answer_stats(row: list[int], logps: list[float], ents: list[float], steps: int, eos: set[int],
                  stop: list[str], decode) -> AnswerStats:
    """A row of ``model.generate``'s output (trailing pads stripped) as ``AnswerStats``: a final EOS
    ends the answer and is not part of it; a row that stopped early with pad == EOS lost its EOS to
    the stripping, so "shorter than the batch and no stop string" also means EOS."""
    if row and row[-1] in eos:
        row, how = row[:-1], ending(eos=True, stop=False)
    else:
        hit = stop_hit(decode(row), stop) if stop else False
        how = ending(eos=not hit and len(row) < steps, stop=hit)
    return AnswerStats(logps[:len(row)], ents[:len(row)], how)


def _sampling_payload(kwargs: dict) -> dict:
    """lm-eval's sampling gen_kwargs as completions-API fields (``top_k``: vLLM's extension); greedy: none (the
    client sends temperature 0)."""
    if not kwargs.get("do_sample"):
        return {}
    out: dict = {"temperature": float(kwargs.get("temperature") or 1.0), "top_p": float(kwargs.get("top_p") or 1.0)}
    if int(kwargs.get("top_k") or 0) > 0:
        out["extra_body"] = {"top_k": int(kwargs["top_k"])}
    return out


@dataclass
class _Req:
    """What ``HFLM`` reads from a request."""

    args: tuple


class TextMASLM(TemplateLM):
    """``lm_eval --model textmas``. What it holds, by name (the model_arg stays ``backend=hf|openai``):

    ``backend``: lm-eval's own attribute, ``"causal"`` (``TemplateLM`` reads it for its tokenization mode;
    lm-eval's name, so it cannot say more). ``backend_kind``: the user's ``backend=`` choice, ``"hf"`` or
    ``"openai"``, as logged in results. ``agent_backend``: the object the agents' text goes through
    (``HFBackend`` in process, or ``OpenAIBackend`` for a server): every upstream agent, and with
    ``openai`` the final agent too. ``final_hflm``: with ``hf``, the final agent as lm-eval's ``HFLM``
    (``FinalAgentLM``: answers exactly as ``hf``), which also owns the model and tokenizer that
    ``agent_backend`` uses; ``None`` with ``openai``.
    """

    def __init__(self, pretrained: str = DEFAULT_MODEL, backend: str = "hf",
                 base_url: str | None = None, model: str | None = None, tokenizer: str | None = None,
                 api_key: str | None = None, timeout: float = TIMEOUT_S, max_retries: int = MAX_RETRIES,
                 num_concurrent: int = NUM_CONCURRENT, seed: int | None = None,
                 agents: int | None = None, topology: str = "sequential", agent_max_tokens: int = 512,
                 roles: str | None = None, family: str | None = None, dtype: str = "auto", device: str | None = None,
                 batch_size: int | str = 1, max_batch_size: int | None = 64, max_length: int | None = None,
                 enable_thinking: bool | None = None, trust_remote_code: bool = False,
                 **hf_args) -> None:
        super().__init__()
        if backend not in ("hf", "openai"):
            raise ValueError(f"backend={backend!r} is not valid; choose hf or openai")
        hf_args = check_model_args("textmas", hf_args, OPTIONS, hf=backend == "hf" or "backend=hf")
        if not str(batch_size).isdigit():
            raise ValueError(f"textmas needs an integer batch_size (got {batch_size!r}), e.g. --batch_size 8")
        role_map, order = resolve_roles(family, roles, agents, topology)  # as lm_eval --model diffmas resolves them
        self.batch_size = int(batch_size)
        self.max_gen_toks = 256  # lm-eval's default when a task sets none (as HFLM)
        self.backend = "causal"  # TemplateLM's tokenization mode (decoder-only)
        self.backend_kind = backend
        self.enable_thinking = enable_thinking
        self.seed = None if seed in (None, "") else int(seed)
        if backend == "hf":
            self.final_hflm = FinalAgentLM(
                pretrained=resolve_pretrained(pretrained), dtype=dtype,
                device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
                batch_size=self.batch_size, max_batch_size=max_batch_size, max_length=max_length,
                enable_thinking=enable_thinking, trust_remote_code=trust_remote_code,
                tokenizer=resolve_pretrained(tokenizer) if tokenizer else None, **hf_args)
            self.tokenizer = self.final_hflm.tokenizer
            agent_backend = HFBackend(self.final_hflm.model, self.tokenizer, self.final_hflm.tok_encode,
                                      self.batch_size)
            self._chunk = self.batch_size
        else:
            if not base_url:
                raise ValueError("backend=openai needs base_url=, e.g. base_url=http://127.0.0.1:8000/v1")
            self.final_hflm = None
            source = resolve_pretrained(tokenizer or pretrained)
            self.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            served = model or (resolve_pretrained(pretrained) if pretrained.startswith("bundled:") else pretrained)
            agent_backend = OpenAIBackend(base_url, served, api_key or os.environ.get("OPENAI_API_KEY"),
                                         timeout=float(timeout), max_retries=int(max_retries),
                                         num_concurrent=int(num_concurrent))
            self._chunk = max(self.batch_size, int(num_concurrent))
        self.agent_backend = agent_backend
        if self.final_hflm is not None:  # accelerate launch: the inner HFLM's rank (``rank``), as diffmas does
            self.final_hflm.join_data_parallel()
        self.chain = TextChain(agent_backend, self.tokenizer, order, role_map, topology, int(agent_max_tokens),
                               enable_thinking)
        self.final_role = order[-1]
        self.accounting = Accounting("textmas")
        self._chats: dict[str, tuple[list[dict], bool]] = {}


    @property
    def rank(self) -> int:
        """The final agent's HFLM's rank under ``accelerate launch`` (backend=hf); 0 otherwise."""
        final = getattr(self, "final_hflm", None)
        return final.rank if final is not None else 0

    @property
    def world_size(self) -> int:
        final = getattr(self, "final_hflm", None)
        return final.world_size if final is not None else 1

    # -- tokenizer, as HFLM ---------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.final_hflm.eot_token_id if self.final_hflm else self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.final_hflm:
            return self.final_hflm.prefix_token_id
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if self.final_hflm:
            return self.final_hflm.tok_encode(string, add_special_tokens=add_special_tokens, **kwargs)
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            kw["add_special_tokens"] = False
        return self.tokenizer.encode(string, **kw)

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    # -- what each agent reads --------------------------------------------------------------------
    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if self.final_hflm:
            return self.final_hflm.apply_chat_template(messages, add_generation_prompt)
        kwargs = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt, **kwargs)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Format exactly as ``hf`` does; remember the turns, to put the upstream texts in the last user turn."""
        messages = [dict(m) for m in chat_history]
        text = self._render(messages, add_generation_prompt)
        if last_user_turn(messages) is not None:
            self._chats[text] = (messages, add_generation_prompt)
        return text

    def question(self, context: str) -> str:
        if context in self._chats:
            messages, _ = self._chats[context]
            return messages[last_user_turn(messages)]["content"]
        return context

    def final_context(self, context: str, trace: TextTrace) -> str:
        """The final agent's text: the note with the upstream texts, then the context as the task made it."""
        note = trace.preamble()
        if not note:
            return context
        if context in self._chats:
            messages, agp = self._chats[context]
            messages = [dict(m) for m in messages]
            last = last_user_turn(messages)
            messages[last]["content"] = note + messages[last]["content"]
            return self._render(messages, agp)
        return note + context

    def _agents_log(self, trace: TextTrace, final_tokens: int | None, per_sample: float) -> list[dict]:
        """Upstream agents' texts, tokens and share of the time; the final agent's tokens and the rest."""
        rest = max(0.0, per_sample - sum(a.seconds for a in trace.agents))
        return [a.to_dict() for a in trace.agents] + [
            {"role": self.final_role, "tokens": final_tokens, "seconds": round(rest, 4)}]

    # -- generation -------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="textmas generate_until")
        groups = group_by_gen_kwargs(requests)
        for indices in groups.values():  # every decoding setup, before any compute
            check_gen_kwargs(requests[indices[0]].args[1])
        for indices in groups.values():
            gen_kwargs = requests[indices[0]].args[1]
            kwargs = normalize_gen_kwargs(copy.deepcopy(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = kwargs.pop("max_gen_toks")
            sampling = _sampling_payload(kwargs) if self.final_hflm is None else {}
            # over the whole group, so a prompt's k samples get k seeds whichever chunk each falls in
            seed_of = dict(zip(indices, request_seeds(self.seed if sampling else None,
                                                      [requests[i].args[0] for i in indices])))
            for c0 in range(0, len(indices), self._chunk):
                chunk = indices[c0:c0 + self._chunk]
                args = [requests[i].args for i in chunk]
                t0 = time.perf_counter()
                traces = self.chain.run([self.question(a[0]) for a in args])
                finals = [self.final_context(a[0], t) for a, t in zip(args, traces)]
                if self.final_hflm is not None:
                    texts = self.final_hflm.generate_until(
                        [_Req((f, copy.deepcopy(a[1]))) for f, a in zip(finals, args)], disable_tqdm=True)
                    tokens = [self.final_hflm.generated.get(f) for f in finals]  # a repeated sample shares its context
                    stats = [self.final_hflm.stats[f].popleft().record() for f in finals]
                    for f in finals:
                        self.final_hflm.generated.pop(f, None)
                        self.final_hflm.stats.pop(f, None)
                else:  # stability metrics from the server's sampled-token logprobs (vLLM; absent where none)
                    outs = self.agent_backend.generate(finals, max_gen, stop=until, seeds=[seed_of[i] for i in chunk],
                                                       logprobs=0, **sampling)
                    eos_ids = {self.tokenizer.eos_token_id, self.eot_token_id}
                    texts, tokens = [o.text for o in outs], [o.tokens for o in outs]
                    stats = [served_record(o, eos_ids, self.tokenizer) for o in outs]
                per = (time.perf_counter() - t0) / len(chunk)
                for i, a, trace, text, n, st in zip(chunk, args, traces, texts, tokens, stats):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", a, text)
                    self.accounting.record(requests[i], self._agents_log(trace, n, per), per, stability=st,
                                           backend=self.backend_kind, topology=self.chain.topology)
                bar.update(len(chunk))
        bar.close()
        return results

    # -- scoring ----------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``log p(continuation | upstream texts, context)``; one text trace per distinct question."""
        by_question: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            by_question[self.question(req.args[0])].append(i)
        questions = list(by_question)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="textmas loglikelihood")
        for q0 in range(0, len(questions), self._chunk):
            chunk = questions[q0:q0 + self._chunk]
            t0 = time.perf_counter()
            traces = self.chain.run(chunk)
            idx = [i for q in chunk for i in by_question[q]]
            trace_of = {i: t for q, t in zip(chunk, traces) for i in by_question[q]}
            pairs = []
            for i in idx:
                ctx, cont = requests[i].args
                pairs.append((self.final_context(ctx, trace_of[i]) if ctx else ctx, cont))
            scores = (self.final_hflm.loglikelihood([_Req(p) for p in pairs], disable_tqdm=True)
                      if self.final_hflm is not None else self._remote_loglikelihood(pairs))
            per = (time.perf_counter() - t0) / len(chunk)
            for i, res in zip(idx, scores):
                results[i] = res
                self.cache_hook.add_partial("loglikelihood", requests[i].args, res)
            for q, trace in zip(chunk, traces):
                first, *rest = by_question[q]
                self.accounting.record(requests[first], self._agents_log(trace, 0, per), per,
                                       backend=self.backend_kind, topology=self.chain.topology)
                for i in rest:
                    self.accounting.register(requests[i], self.accounting.records[-1])
            bar.update(len(idx))
        bar.close()
        return results

    def _remote_loglikelihood(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        out = []
        for ctx, cont in pairs:
            if ctx:
                ctx_ids, cont_ids = self._encode_pair(ctx, cont)
            else:
                cont_ids = self.tok_encode(cont, add_special_tokens=False)
                ctx_ids = [self.prefix_token_id]
            scored = self.agent_backend.prompt_logprobs(ctx_ids + cont_ids)[-len(cont_ids):]
            if any(v is None for v, _ in scored):
                raise BackendError(f"{self.agent_backend.base_url} returned no log-probability for some prompt tokens")
            out.append((sum(v for v, _ in scored), all(g for _, g in scored)))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        raise NotImplementedError("textmas scores through loglikelihood()")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        if self.final_hflm is not None and not self.chain.upstream:
            return self.final_hflm.loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        raise NotImplementedError("textmas supports loglikelihood_rolling only with backend=hf and agents=1")

    # -- data parallel (backend=hf under accelerate launch): the inner HFLM's collectives -------------
    def all_gather(self, tensor):
        return self.final_hflm.all_gather(tensor) if self.final_hflm is not None else tensor

    def gather_object(self, obj, dst=0):
        return self.final_hflm.gather_object(obj, dst) if self.final_hflm is not None else [obj]

    def barrier(self) -> None:
        """lm-eval's barrier after each request type: also bring every rank's accounting to rank 0."""
        if self.final_hflm is not None:
            self.final_hflm.barrier()
            self.accounting.gather(self)

    # -- reporting --------------------------------------------------------------------------------
    def get_model_info(self) -> dict:
        info = {"textmas": {"backend": self.backend_kind, "topology": self.chain.topology,
                            "roles": self.chain.roles, "agent_max_tokens": self.chain.agent_max_tokens},
                "accounting": self.accounting.summary(), "stability": self.accounting.stability()}
        if self.final_hflm is None:
            info["textmas"]["base_url"] = self.agent_backend.base_url
            info["textmas"]["model"] = self.agent_backend.model
        return info
