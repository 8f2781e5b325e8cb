"""``lm_eval --model diffmas``: the DiffMAS chain behind lm-eval's LM interface.

A thin adapter: HFLM loads the model and tokenizer and tokenizes requests exactly as ``hf`` does;
this class only routes each request through the chain. Upstream agents read the task's question
(the context before chat formatting); the final agent reads the trace, a one-line note about it,
and then the context exactly as the task formatted it. With ``agents=1`` there is no trace and no
note, so the final agent sees exactly what ``--model hf`` sees (the tests use ``hf`` as the oracle).

Every ``hf`` model_arg the chain can honour works: whatever is not one of ``OPTIONS`` and is a parameter of
``HFLM.__init__`` (read from its signature, see ``common.check_model_args``) goes to ``HFLM``
unchanged. HFLM's scoring-only knobs (``truncation``, ``logits_cache``, ``softmax_dtype``, ``UNHONOURED``) are
refused with the reason when given another value than HFLM's default: the chain scores its own way (in
float32, one prefill per context over the trace, a row that does not fit refused rather than truncated), so
they would be silently dropped. ``batch_size=auto`` sizes a batch for what a DiffMAS
row holds (``batching.py``).
"""

from __future__ import annotations

import gc
import logging
import time
from collections import defaultdict

import torch
from accelerate.utils import find_executable_batch_size
from lm_eval import utils
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from .. import DEFAULT_MODEL
from ..latent import LatentConfig
from ..latent.chain import Generation
from ..latent.config import chain_options
from ..latent.persist import load_trained_chain
from ..memory import trace_positions
from ..models import bnb_config, require_bitsandbytes, resolve_pretrained
from ..prompts import ROLE_OPTIONS, final_preamble, final_prompt_ids, last_user_turn, with_note
from ..serving import Completion
from ..serving.client import MAX_RETRIES, NUM_CONCURRENT, TIMEOUT_S, client_options, request_seeds
from ..serving.stage2_vllm import PromptEmbedsBackend, Sampling, trace_embeddings
from ..stability import served_record
from ..stopping import eos_ids
from ..tasks.protocol import check_gen_kwargs
from .batching import CPU_SHARE, FIXES, PROBE_SHARE, NoRowFitsError, RowCost, cpu_batch_size, parse_batch_size
from .common import Accounting, DataParallel, check_model_args, group_by_gen_kwargs

# model_args that are not chain options: loading, roles, batching, stage 2 (the chain's own come from its schema)
MODEL_OPTIONS = {
    "pretrained": f"hub id, local path or bundled:NAME (default {DEFAULT_MODEL})",
    # also a Hub repo id (latent.persist.load_trained_chain); the help is README's generated option reference
    "peft": "path of a PEFT adapter (e.g. the output_dir of trainers/sft.py; its saved chain options apply)",
}
RUN_OPTIONS = {
    **ROLE_OPTIONS,
    "device": "cuda, cuda:N or cpu (default: cuda if available)",
    "batch_size": "questions per batch: an integer, auto or auto:N (sized for trace + final agent)",
    "stage2": "hf (final agent in process, default) | vllm (its decoding on a `vllm serve --enable-prompt-embeds` "
              "server, the trace sent as prompt embeddings; log-likelihoods stay in process)",
    "served_model": "stage2=vllm: model name sent to the server (default: pretrained as given; with peft, the "
                    "adapter's --lora-modules name)",
    **client_options("stage2=vllm"),
    "seed": "stage2=vllm with sampling (do_sample): each request's seed derives from it, its prompt and its sample "
            "index (serving.client.request_seeds), so a sampled served run is reproducible",
}


def model_options(config_class: type[LatentConfig] = LatentConfig) -> dict[str, str]:
    """Every diffmas model_arg and its one-line help, in the order the typo message lists them: the model,
    then the chain's options offered to lm-eval (``latent.config.chain_options``), then the rest."""
    chain = {o.name: o.describe() for o in chain_options(config_class, front="lm_eval")}
    return {**MODEL_OPTIONS, **chain, **RUN_OPTIONS}


OPTIONS = model_options()
# HFLM arguments the chain cannot honour: their HFLM default, and why another value is refused
UNHONOURED = {
    "truncation": (False, "the chain never truncates a context: a row whose trace and final agent do not fit the "
                          "model's context (or max_trace_tokens) is refused before compute"),
    "logits_cache": (True, "the chain prefills each context once over its question's trace and scores every "
                           "continuation from it; HFLM's logits cache is not used"),
    "softmax_dtype": (None, "the chain computes every log-softmax in float32"),
}


def refuse_unhonoured(hf_args: dict) -> None:
    """Refuse, with the reason, an ``hf`` argument the chain would ignore (``UNHONOURED``) at a non-default value."""
    for name, (default, why) in UNHONOURED.items():
        if name in hf_args and hf_args[name] != default:
            raise ValueError(f"diffmas cannot honour {name}={hf_args[name]!r}: {why}; drop it (lm-eval's hf "
                             f"applies it; HFLM's default is {default!r})")
eval_logger = logging.getLogger("lm_eval.models.diffmas")  # under lm-eval's logger and verbosity

def _check_stage2(stage2: str, trace: str, base_url: str | None, served_model: str | None) -> None:
    """``stage2=vllm`` (``serving/stage2_vllm.py``) needs one causal sequence, a server and the name it serves."""
    if stage2 not in ("hf", "vllm"):
        raise ValueError(f"stage2={stage2!r} is not valid; use hf (in process) or vllm")
    if stage2 == "hf":
        return
    if trace != "concat":
        raise ValueError(f"stage2=vllm needs trace=concat and topology=sequential: the {trace} trace is not one "
                         "causal sequence of input embeddings (overwrite drops segments; stitch and hierarchical "
                         "mask each segment from the others and restart its positions), so vLLM cannot replay "
                         f"it; use stage2=hf for {trace}")
    if not base_url:
        raise ValueError("stage2=vllm needs base_url=, e.g. base_url=http://127.0.0.1:8000/v1 "
                         "(a server started with `vllm serve MODEL --enable-prompt-embeds`)")
    if not served_model:
        raise ValueError("stage2=vllm needs served_model= with peft= (or a model object): the name the server "
                         "serves, e.g. NAME of `vllm serve MODEL --enable-prompt-embeds --enable-lora "
                         "--lora-modules NAME=ADAPTER_DIR`")


# lm-eval ``hf``'s flat bitsandbytes model_args (``common.FROM_PRETRAINED``), each a ``bnb_config`` parameter
QUANT_ARGS = ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_compute_dtype",
              "bnb_4bit_use_double_quant")


class DiffMASLM(DataParallel, HFLM):
    # The chain's options schema: its user-facing fields (``latent.config.chain_options``) are model_args
    # here, taken from ``**kwargs`` by name; a subclass with more options sets its own.
    config_class: type[LatentConfig] = LatentConfig

    def __init__(self, pretrained=DEFAULT_MODEL, peft: str | None = None, roles: str | None = None,
                 family: str | None = None, device: str | None = None, batch_size: int | str = 1,
                 stage2: str = "hf", base_url: str | None = None, served_model: str | None = None,
                 timeout: float = TIMEOUT_S, max_retries: int = MAX_RETRIES, num_concurrent: int = NUM_CONCURRENT,
                 seed: int | None = None, **kwargs) -> None:
        """``kwargs``: the chain options (``OPTIONS``; ``None`` means not given) and every ``hf`` model_arg."""
        schema = chain_options(self.config_class, front="lm_eval")
        given = {o.name: o.parse(kwargs.pop(o.name)) for o in schema if o.name in kwargs}
        given = {k: v for k, v in given.items() if v is not None}
        hf_args = check_model_args("diffmas", kwargs, model_options(self.config_class))
        refuse_unhonoured(hf_args)
        served_model = served_model or (pretrained if isinstance(pretrained, str) and not peft else None)
        parse_batch_size("diffmas", batch_size)
        if hf_args.get("backend") == "seq2seq":
            raise ValueError("diffmas needs a decoder-only (causal) model; drop backend=seq2seq")
        local = isinstance(pretrained, str) and not pretrained.startswith("bundled:")
        # explicit model_args > the chain saved beside a trained adapter/model (trainers/sft.py) > defaults
        trained = load_trained_chain(peft, also=pretrained if local else None, config_class=self.config_class,
                                     family=family, roles_file=roles, **given)
        peft, config = trained.adapter, trained.config  # peft: a Hub id's local snapshot
        enable_thinking = config.enable_thinking
        layout = "hierarchical" if config.topology == "hierarchical" else config.trace
        _check_stage2(stage2, layout, base_url, served_model)  # before loading the model
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(pretrained, str):
            pretrained = resolve_pretrained(pretrained)
        super().__init__(pretrained=pretrained, peft=peft, device=device, batch_size=batch_size,
                         enable_thinking=enable_thinking, **hf_args)
        self.chain = trained.build(self.model, self.tokenizer)  # with the realignment trained with SFT, if any
        self._preamble = final_preamble(config.upstream)
        self._chat_questions: dict[str, str] = {}
        self.accounting = Accounting("diffmas")
        self.seed = None if seed in (None, "") else int(seed)
        self.stage2_server: PromptEmbedsBackend | None = None  # stage2=vllm: the server the final agent decodes on
        if stage2 == "vllm":
            served = resolve_pretrained(served_model) if served_model.startswith("bundled:") else served_model
            self.stage2_server = PromptEmbedsBackend(base_url, served, timeout=timeout, max_retries=max_retries,
                                                     num_concurrent=num_concurrent)
            # before any answer: a clear error, or the embedding scale the server applies
            self.stage2_server.preflight(self.model, self.tokenizer, eos=eos_ids(self.model, self.tokenizer))
        self.join_data_parallel()

    def _create_model(self, pretrained: str, *, quantization_config=None, **kwargs) -> None:
        """HFLM's loading, with the ``hf`` quantization model_args it lists (``load_in_4bit``, ``load_in_8bit``,
        ``bnb_4bit_*``) turned into the ``BitsAndBytesConfig`` transformers 5 takes (its ``from_pretrained``
        rejects the flat keywords), checked before any weight is read: bitsandbytes missing or unable to run on
        the device is a clear error. The quantized model is placed whole on the device unless a ``device_map``
        or ``parallelize`` places it (it cannot be moved after loading)."""
        flat = {k: kwargs.pop(k) for k in QUANT_ARGS if k in kwargs}
        bnb = bnb_config(**{k: v for k, v in flat.items() if v is not None})
        if bnb is not None:
            if quantization_config is not None:
                raise ValueError("the checkpoint is already quantized; drop load_in_4bit/load_in_8bit/bnb_4bit_*")
            require_bitsandbytes(self._device)
            quantization_config = bnb
            if not kwargs.get("parallelize") and kwargs.get("device_map") is None:
                kwargs["device_map"] = {"": str(self._device)}
        super()._create_model(pretrained, quantization_config=quantization_config, **kwargs)

    def barrier(self) -> None:
        """lm-eval's barrier after each request type: also bring every rank's accounting to rank 0."""
        super().barrier()
        self.accounting.gather(self)

    # -- what each agent reads --------------------------------------------------------------------
    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Format as ``hf`` does, with the trace note in the last user turn; remember the bare question."""
        messages = [dict(m) for m in chat_history]
        last_user = last_user_turn(messages)
        if last_user is None:
            return super().apply_chat_template(messages, add_generation_prompt)
        question = messages[last_user]["content"]
        text = super().apply_chat_template(with_note(messages, self._preamble), add_generation_prompt)
        self._chat_questions[text] = question
        return text

    def question(self, context: str) -> str:
        return self._chat_questions.get(context, context)

    def _final_ids(self, context: str, context_ids: list[int], encoded: str | None = None) -> list[int]:
        """The final agent's tokens: the note on the trace (unless already in the chat turn), then the context.

        ``encoded`` is the text ``context_ids`` encode (lm-eval's log-likelihood requests encode the context without
        its trailing whitespace). The note and that text are tokenized by ``prompts.final_prompt_ids``, the one
        tokenization of the final prompt (SFT's, ``ask``'s), with lm-eval's BOS, if it put one, kept first."""
        if not self._preamble or context in self._chat_questions:
            return list(context_ids)
        joint = final_prompt_ids(self.tokenizer, self.chain.config.upstream, context if encoded is None else encoded,
                                 add_special_tokens=False)
        bos = self.tokenizer.bos_token_id
        return [bos, *joint] if bos is not None and context_ids[:1] == [bos] else joint

    # -- accounting -------------------------------------------------------------------------------
    def _agents_log(self, final_tokens: int) -> list[dict]:
        """Upstream agents write latent steps, not tokens; the final agent's generated tokens."""
        steps = self.chain.config.latent_steps
        return [{"role": r, "tokens": 0, "latent_steps": steps} for r in self.chain.config.upstream] + [
            {"role": self.chain.config.roles[-1], "tokens": final_tokens}]

    def get_model_info(self) -> dict:
        return {**super().get_model_info(), "accounting": self.accounting.summary(),
                "stability": self.accounting.stability()}

    # -- batching ---------------------------------------------------------------------------------
    def _precision(self):
        """``mixed_precision_dtype``, applied to every forward of the chain as HFLM applies it to its own."""
        dtype = self.mixed_precision_dtype
        return torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype is not None)

    def _plan(self, questions: list[str], final: list[int], scored: list[int],
              size: int | None = None) -> list[tuple[list[int], int]]:
        """Batches of row indices and the rows per forward: in order for a fixed batch size (or ``size``);
        for ``auto``, longest first (as ``hf``), sized at ``batch_schedule`` points (``auto:N``: N times)."""
        n = len(questions)
        if size is not None or self.batch_size != "auto":
            size = int(size or self.batch_size)
            return [(list(range(i, min(i + size, n))), size) for i in range(0, n, size)]
        upstream = len(self.chain.config.upstream)
        length = [final[i] + upstream * len(self.tok_encode(q)) for i, q in enumerate(questions)]
        order = sorted(range(n), key=lambda i: -length[i])
        step = max(1, int(n / self.batch_schedule))
        self.batch_sizes, plan, pos = {}, [], 0
        while pos < n:
            sched = pos // step
            if sched not in self.batch_sizes:
                prev = self.batch_sizes.get(sched - 1)
                i, j = order[pos], order[-1]  # the longest row left and the shortest: the batch's spread
                self.batch_sizes[sched] = prev if prev == self.max_batch_size else self._auto_batch_size(
                    questions[i], final[i], scored[i], (questions[j], final[j], scored[j]))
            size = self.batch_sizes[sched]
            plan.append((order[pos:pos + size], size))
            pos += size
        return plan

    def _auto_batch_size(self, question: str, final: int, scored: int,
                         shortest: tuple[str, int, int] | None = None) -> int:
        """Rows per batch for the longest row left: its trace (upstream prompts + latent steps) and the
        final agent's ``final`` positions (prompt + answer). CUDA: probe the real scoring path for OOM from
        ``max_batch_size`` down, as ``hf`` does, with the batch's length spread (``shortest``: the shortest
        row's question, final and scored positions), and keep ``PROBE_SHARE`` of what ran; otherwise: from the
        free memory, without probing."""
        prompts = [len(agent[0]) for agent in self.chain.upstream_prompts([question])]
        trace = trace_positions(prompts, self.chain.config.latent_steps)
        final = max(2, min(final, self.max_length - trace))  # a longer row is refused before compute anyway
        cost = RowCost.of(self.model)
        per_row = cost.row(trace, final, prefill=max([final, *prompts]), scored=scored)
        if self._probes():
            size, how = self._probe(question, final, scored, shortest), f"{PROBE_SHARE:.0%} of what ran on cuda"
        else:
            size, how = cpu_batch_size(per_row, self.max_batch_size), f"{CPU_SHARE:.0%} of free memory"
        steps = self.chain.config.latent_steps
        eval_logger.info(
            f"diffmas batch_size auto: {size} rows ({how}; max_batch_size={self.max_batch_size}). One row: trace "
            f"{trace} positions ({len(prompts)} upstream agents, prompts {prompts} + {steps} latent steps each) "
            f"+ final agent {final} positions, {cost.bytes_per_position} B of KV cache per position, "
            f"about {per_row / 2**20:.1f} MiB at its peak")
        return size

    def _probes(self) -> bool:
        """Whether ``auto`` probes for out-of-memory: only on CUDA, where running out is an exception (on a CPU it
        is swapping or being killed)."""
        return self.device.type == "cuda"

    def _probe(self, question: str, final: int, scored: int, shortest: tuple[str, int, int] | None = None) -> int:
        """The batch size to use: ``PROBE_SHARE`` of the largest batch (from ``max_batch_size``, shrinking on OOM)
        that runs ``_score``'s own path once: stage 1, one prefill per row, one continuation scored per row.

        Rows alternate between the longest request (``question``, ``final`` positions of which ``scored`` are
        scored) and ``shortest`` (default: the longest again), so the probe pays what a real batch pays for its
        spread: padded prompts and their ``left_align`` copies, a prefill over ragged contexts, and the trace
        selected per prefix and per continuation (``_score_rows``). Identical rows paid none of it. The share
        keeps room for what a probe does not see: the allocator's fragmentation over a long run, and rows of
        lengths between the two."""
        rows = [(question, final, scored), shortest or (question, final, scored)]
        spec = []
        for q, f, s in rows:
            f = max(2, f)
            s = max(1, min(s, f - 1))
            spec.append((q, f, [self.prefix_token_id] * (f - s), [self.prefix_token_id] * s))

        @find_executable_batch_size(starting_batch_size=self.max_batch_size or 64)
        def run(batch_size: int) -> int:
            picked = [spec[r % 2] for r in range(batch_size)]
            items = [(q, ctx, cont) for q, _, ctx, cont in picked]
            with torch.no_grad():
                self._score_rows([q for q, *_ in picked], [f for _, f, *_ in picked], [[r] for r in range(batch_size)],
                                 items, batch_size, lambda i, res: None)
            return batch_size

        try:
            size = run()
        except RuntimeError as e:
            if "No executable batch size found" not in str(e):
                raise
            gc.collect()
            torch.cuda.empty_cache()
            raise NoRowFitsError(
                f"diffmas batch_size auto: even one row ran out of {self.device.type} memory (stage 1 and the final "
                f"agent's forward over the trace, {final} final-agent positions); {FIXES}") from None
        gc.collect()
        torch.cuda.empty_cache()  # what the probes held
        return max(1, int(size * PROBE_SHARE))

    # -- scoring (always in process: vLLM refuses prompt_logprobs with prompt embeddings) ------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        t0 = time.perf_counter()
        results = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        by_question: dict[str, list] = defaultdict(list)
        for req in requests:
            by_question[self.question(req.args[0])].append(req)
        per = (time.perf_counter() - t0) / max(1, len(by_question))  # one trace per question
        for first, *rest in by_question.values():
            record = self.accounting.record(first, self._agents_log(0), per)
            for req in rest:
                self.accounting.register(req, record)
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        items = [(self.question(ctx), self._final_ids(ctx, ctx_ids, ctx.rstrip()), cont_ids)
                 for (ctx, _), ctx_ids, cont_ids in requests]
        results = self._score(items, disable_tqdm)
        for (key, _, _), res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    @torch.no_grad()
    def _score(self, items: list[tuple[str, list[int], list[int]]], disable_tqdm: bool = False,
               desc: str = "diffmas loglikelihood", size: int | None = None) -> list[tuple[float, bool]]:
        """One trace per distinct question and one prefill of each distinct context over it, shared by
        all of that context's continuations (a multiple-choice question's choices)."""
        by_question: dict[str, list[int]] = defaultdict(list)
        for i, (question, _, _) in enumerate(items):
            by_question[question].append(i)
        questions = list(by_question)
        final = [max(len(items[i][1]) + len(items[i][2]) for i in by_question[q]) for q in questions]
        scored = [max(len(items[i][2]) for i in by_question[q]) for q in questions]
        results: list[tuple[float, bool] | None] = [None] * len(items)
        plan = self._plan(questions, final, scored, size)  # before the bar: auto logs the size it picks
        with tqdm(total=len(items), disable=disable_tqdm or self.rank != 0, desc=desc) as bar:
            def done(i: int, res: tuple[float, bool]) -> None:
                results[i] = res
                bar.update(1)

            for rows, bs in plan:
                self._score_rows([questions[r] for r in rows], [final[r] for r in rows],
                                 [by_question[questions[r]] for r in rows], items, bs, done)
        return results

    def _score_rows(self, chunk: list[str], finals: list[int], groups: list[list[int]],
                    items: list[tuple[str, list[int], list[int]]], bs: int, done) -> None:
        """One batch of ``_score``: a trace over ``chunk`` (questions; ``finals``: each row's final-agent
        positions), then for row r the items ``groups[r]``: each distinct context prefilled once, its
        continuations scored from it, ``bs`` rows per forward; ``done(i, result)`` per item. The
        ``batch_size=auto`` probe runs this same path."""
        with self._precision():
            trace = self.chain.stage1(chunk, final_tokens=finals)
        # each distinct (question, final-agent context) is prefilled once; its continuations go on from it
        prefixes: dict[tuple, int] = {}
        pairs = [(prefixes.setdefault((row, tuple(items[i][1])), len(prefixes)), i)
                 for row, group in enumerate(groups) for i in group]
        keys = list(prefixes)
        for k0 in range(0, len(keys), bs):
            part = keys[k0:k0 + bs]
            with self._precision():
                prefixed, first = self.chain.prefill(trace.select([row for row, _ in part]),
                                                    [list(ctx) for _, ctx in part])
            todo = [(p - k0, i) for p, i in pairs if k0 <= p < k0 + len(part)]
            for t0 in range(0, len(todo), bs):
                sel = todo[t0:t0 + bs]
                picks = torch.tensor([p for p, _ in sel], device=first.device)
                with self._precision():
                    scores = self.chain.continuation_scores(prefixed.select(picks), first[picks],
                                                            [items[i][2] for _, i in sel])
                for (_, i), res in zip(sel, scores):
                    done(i, res)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity of a document by the final agent, over a trace the upstream agents built from it."""
        out, size = [], None
        if self.batch_size == "auto" and requests:  # sized once, for the longest document's windows
            longest = max((r.args[0] for r in requests), key=len)
            n = len(self.tok_encode(longest)) + 1
            size = self.batch_sizes[0] = self._auto_batch_size(longest, n, n)
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm or self.rank != 0,
                              desc="diffmas loglikelihood_rolling"):
            with torch.no_grad(), self._precision():
                used = int(self.chain.stage1([string]).next_pos.max()) if self.chain.config.upstream else 0
            note = self._final_ids("", []) if self._preamble else []
            windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length - used - len(note), context_len=1))
            items = [(string, note + ctx, cont) for ctx, cont in windows]
            total = sum(score for score, _ in self._score(items, disable_tqdm=True, size=size))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # -- generation -------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups = group_by_gen_kwargs(requests)
        for indices in groups.values():  # every decoding setup, before any compute
            check_gen_kwargs(requests[indices[0]].args[1])
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="diffmas generate_until")
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = kwargs.pop("max_gen_toks")
            sampling = dict(do_sample=bool(kwargs.get("do_sample")),
                            temperature=float(kwargs.get("temperature") or 1.0),
                            top_p=float(kwargs.get("top_p") or 1.0), top_k=int(kwargs.get("top_k") or 0))
            contexts = [requests[i].args[0] for i in indices]
            served_seed = self.seed if sampling["do_sample"] and self.stage2_server is not None else None
            seed_of = dict(zip(indices, request_seeds(served_seed, contexts)))  # a prompt's k samples: k seeds
            questions = [self.question(c) for c in contexts]
            finals = [self._final_ids(c, self.tok_encode(c)) for c in contexts]
            need = [len(f) + max_gen for f in finals]
            for rows, _ in self._plan(questions, need, [1] * len(indices)):
                batch = [indices[r] for r in rows]
                t0 = time.perf_counter()
                with torch.no_grad(), self._precision():
                    trace = self.chain.stage1([questions[r] for r in rows], final_tokens=[need[r] for r in rows],
                                              record_inputs=self.stage2_server is not None)
                if self.stage2_server is not None:  # the final agent decodes on the vLLM server
                    gens = self._remote_generate(trace, [finals[r] for r in rows], max_gen, until, sampling,
                                                 [seed_of[i] for i in batch])
                else:
                    with self._precision():
                        gens = self.chain.generate(trace, [finals[r] for r in rows], max_new_tokens=max_gen,
                                                   stop=until, **sampling)
                per = (time.perf_counter() - t0) / len(batch)
                for i, gen in zip(batch, gens):
                    results[i], tokens, stability = self._finish(gen, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                    self.accounting.record(requests[i], self._agents_log(tokens), per, stability=stability)
                bar.update(len(batch))
        bar.close()
        return results

    def _remote_generate(self, trace, finals: list[list[int]], max_gen: int, until: list[str],
                         sampling: dict, seeds: list[int | None] | None = None) -> list[Completion]:
        """``stage2=vllm``: each row's trace and final prompt as prompt embeddings, decoded by the server (a sampled
        row with its own seed)."""
        rows = trace_embeddings(self.model, trace, finals)
        return self.stage2_server.generate_embeds(rows, max_gen, until, Sampling(**sampling), seeds)

    def _finish(self, gen: Generation | Completion, until: list[str]) -> tuple[str, int, dict | None]:
        """The answer (after the thinking part if ``think_end_token`` is set, exactly as ``hf``), its generated
        tokens and its stability record. The one place the two stage 2s differ: in process (``Generation``)
        there are token ids and their statistics; a server's answer (``Completion``, ``stage2=vllm``) has text,
        a token count and per-token log-probabilities."""
        if isinstance(gen, Completion):
            return (self._answer_text(gen.text, until), gen.tokens or 0,
                    served_record(gen, set(self.stage2_server.eos), self.tokenizer))
        return self._answer_ids(gen, until), len(gen.token_ids), gen.stats.record() if gen.stats else None

    def _answer_text(self, text: str, until: list[str]) -> str:
        """A server's text after the thinking part (its think token decoded to its text)."""
        end = self.think_end_token
        if end is None:
            return text
        end = self.tok_decode([end], skip_special_tokens=False) if isinstance(end, int) else end
        return postprocess_generated_text(text, until, end)

    def _answer_ids(self, gen: Generation, until: list[str]) -> str:
        """In process: the text after the last think-end token id (or string), as ``hf`` cuts it."""
        end = self.think_end_token
        if end is None:
            return gen.text
        ids = gen.token_ids
        if isinstance(end, int):
            last = [k for k, t in enumerate(ids) if t == end]
            ids = ids[last[-1] + 1:] if last else ids
        text = self.tok_decode(ids)
        text = text.lstrip() if isinstance(end, int) else text
        return postprocess_generated_text(text, until, end if isinstance(end, str) else None)
