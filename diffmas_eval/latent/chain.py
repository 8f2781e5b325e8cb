"""The DiffMAS agent chain: stage 1 writes the latent trace, stage 2 reads it.

Stage 1. Each upstream agent k prefills its prompt (role + question) on top of the trace, then
takes ``m`` latent steps: the last hidden state, realigned into input-embedding space, is fed back
as the next input. Its prompt and latent columns stay appended to the trace.

Stage 2. The final agent prefills its prompt over the whole trace and decodes the answer, scores
continuations, or computes a teacher-forced loss. Every trace column is one attention hop from the
final agent, so the loss reaches every agent's contribution directly (``trace="concat"``).

Independent segments (``trace=stitch``, ``topology=hierarchical``). An upstream agent may instead build its
segment over the question alone: its positions start at 0 and every earlier segment is masked out of its
attention, so its KV is what it would write as the only agent. The segments still lie side by side in one
trace (the layout below is unchanged), and the final agent reads them all, its positions continuing after
the longest segment. One trace, one mask per forward: no second cache layout.

Every call takes token ids per batch row; a new block is right-padded so each row's tokens follow
its trace directly, and the trace is then left-aligned again; positions count real tokens. That
layout (``trace.py``) is why batching never changes a row, sliding-window layers included.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    LogitsProcessorList,
    PreTrainedModel,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from ..memory import trace_positions
from ..models import context_length
from ..prompts import TEXT_ROLES, Role, chat_format, final_preamble, final_prompt_ids, question_prompt
from ..stability import AnswerStats, step_stats
from ..stopping import cut_at_stop, eos_ids
from . import distributed
from .config import LatentConfig
from .realign import Realigner
from .trace import LatentTrace, Segment, left_aligned_mask


class TraceTooLongError(ValueError):
    """The chain would not fit in ``max_trace_tokens`` or the model's context; raised before compute."""


class NonFiniteTraceError(FloatingPointError):
    """An agent wrote inf/NaN into the trace (float16 overflow, typically): every later number would be NaN."""


HALF = (torch.float16, torch.bfloat16)


@contextmanager
def upcast_modules(model: nn.Module):
    """``model``'s half-precision parameters and buffers in float32 inside, one module at a time: each module's
    own half tensors are cast as its forward starts and its original tensors put back as it returns, so the
    float32 copy held at any moment is one module's (Qwen3-8B: its 2.3 GiB ``lm_head``), not the whole model's
    (+16 GB), and the weights come back bit for bit, in their own tensors. The cost is one cast per weight per
    forward (a latent step re-reads the weights anyway; the cast about doubles that traffic). Tensors in other
    dtypes (RoPE's float32 ``inv_freq``) are left alone. Swapping ``.data`` keeps each ``Parameter`` object, so
    optimizers and hooks still hold the same ones; a tied weight is cast by whichever module runs it."""
    owners = [m for m in model.modules()
              if any(t.dtype in HALF for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))]
    saved: dict[int, list] = {}

    def cast(module: nn.Module, args) -> None:
        swapped = [(t, t.data) for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
                   if t.dtype in HALF]
        for t, data in swapped:
            t.data = data.float()
        saved.setdefault(id(module), []).append(swapped)

    def restore(module: nn.Module, args, output) -> None:
        for t, data in saved[id(module)].pop():
            t.data = data

    handles = [h for m in owners for h in (m.register_forward_pre_hook(cast), m.register_forward_hook(restore))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for stack in saved.values():  # a forward that raised leaves its module cast: put it back
            for swapped in stack:
                for t, data in swapped:
                    t.data = data
        saved.clear()


def decoder_of(model: nn.Module) -> nn.Module | None:
    """The base model under the LM head (``get_decoder()`` of the first ``PreTrainedModel`` inside any wrapper:
    PEFT, DDP, FSDP2), whose ``last_hidden_state`` is the last layer's hidden state after the final norm; None
    if there is none."""
    if isinstance(model, distributed.CallThrough):  # the trainer's wrapper registers no submodule: look inside
        model = model.inner
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            get = getattr(module, "get_decoder", None)
            decoder = get() if callable(get) else None
            return decoder if isinstance(decoder, nn.Module) and decoder is not module else None
    return None


@contextmanager
def _checkpoint_layers(model: nn.Module, anchors: list[torch.Tensor]):
    """Inside, every decoder layer of ``model`` (transformers' ``GradientCheckpointingLayer``) runs under
    ``checkpoint``: its activations are recomputed in backward instead of held, the way ``checkpoint_agents``
    recomputes an upstream agent. transformers' own layer checkpointing cannot be used: it turns the cache off,
    and the final agent attends to the trace through it. A layer writes its new columns into the cache (a
    side effect a recompute would repeat on the extended cache), so each call keeps the cache layer's state as
    the layer found it, puts it back before the recompute, and after the call too (the forward's later layers
    read only their own cache layers, and the extended copy is not then held until backward). ``anchors``: a
    tensor per layer device, so each device's RNG (LoRA dropout) is restored for the recompute."""
    if isinstance(model, distributed.CallThrough):  # the trainer's wrapper registers no submodule: look inside
        model = model.inner
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    owned = [(layer, layer.__dict__.get("forward")) for layer in layers]

    def wrap(layer: nn.Module):
        forward = layer.forward
        idx = next((m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)), None)

        def checkpointed(*args, **kwargs):
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            state = cache.layers[idx] if cache is not None and idx is not None else None
            found = dict(vars(state)) if state is not None else None

            def run(*_anchors):
                if found is not None:
                    vars(state).update(found)
                return forward(*args, **kwargs)

            out = checkpoint(run, *anchors, use_reentrant=False)
            if found is not None:
                vars(state).update(found)
            return out

        return checkpointed

    for layer in layers:
        layer.forward = wrap(layer)
    try:
        yield
    finally:
        for layer, own in owned:
            if own is None:
                del layer.forward
            else:
                layer.forward = own


def _agent_of(chain: AgentChain):
    """``chain._agent`` as ``checkpoint`` calls it: its trailing tensor arguments (``_rng_anchors``) dropped."""
    return lambda input_ids, mask, past, *anchors: chain._agent(input_ids, mask, past)


def _pass_on(output, last: torch.Tensor):
    """The decoder's ``output`` with ``hidden_states`` set to ``(last,)``, so the causal LM's output carries it
    (``AgentChain._last_hidden_state`` says why it must)."""
    if isinstance(output, ModelOutput) and "hidden_states" in output.__dataclass_fields__:
        output.hidden_states = (last,)
    return output


# the decode loop reads tokens (their text, for stop strings) on the host at most this many steps apart (and after
# 1, 2, .. steps early on, at most a quarter of the steps made so far): a row a stop string ended is found at most
# that late, its extra steps discarded, so text reads are O(1/SYNC_EVERY) per token and the extra work a bounded
# share. End of sequence is not left to them: one device flag ("some row has not met EOS") is read every step
SYNC_EVERY = 64


def _default_generator(device: torch.device) -> torch.Generator:
    """The generator ``torch.multinomial`` draws from when given none (the device's default one)."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


class _Answers:
    """The host side of decoding: each row's kept tokens, statistics and how it ended, fed chunks of steps.

    Same rules as one token at a time: a row ends at its first EOS (not kept) or at the first token after which
    a stop string appears in its text (kept). The stop check decodes a window of the row's last tokens that
    holds any stop string with room to spare (``4 * len + 3`` tokens, at most 64: a character is at most 4
    byte tokens, and the window's first token, which some tokenizers decode without its leading space, is never
    part of it), once per row and token, not once per stop string over 64 tokens."""

    def __init__(self, rows: int, eos: set[int], stop: list[str], tokenizer) -> None:
        self.eos, self.stop, self.tokenizer = eos, stop, tokenizer
        self.window = min(64, 4 * max(map(len, stop)) + 3) if stop else 0
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.logps: list[list[float]] = [[] for _ in range(rows)]
        self.ents: list[list[float]] = [[] for _ in range(rows)]
        self.ended = ["length"] * rows
        self.done_at = [None] * rows  # the step at which each row ended

    def read(self, tokens: list[list[int]], logps: list[list[float]], ents: list[list[float]],
             first: int) -> int | None:
        """Take steps ``first, first + 1, ..`` of every row; return the step at which the last row ended once all
        have, else None."""
        for i, (toks, lps, ens) in enumerate(zip(tokens, logps, ents)):
            if self.done_at[i] is not None:
                continue
            ids = self.ids[i]
            for j, tok in enumerate(toks):
                if tok in self.eos:
                    self.ended[i], self.done_at[i] = "eos", first + j
                    break
                ids.append(tok)
                self.logps[i].append(lps[j])
                self.ents[i].append(ens[j])
                if self.stop:
                    text = self.tokenizer.decode(ids[-self.window:])
                    if any(s in text for s in self.stop):
                        self.ended[i], self.done_at[i] = "stop", first + j
                        break
        return None if any(d is None for d in self.done_at) else max(self.done_at)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    stats: AnswerStats | None = None  # log-probs and entropies of token_ids, how it ended (``stability.py``)


def _at_last_token(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's ``[B, T, ...] -> [B, ...]`` value at its last real token of a right-padded block
    (``mask``), where ``out`` holds the block's last ``T`` columns; on ``out``'s device (the last
    layer's, when the model is sharded)."""
    last = (mask.sum(-1) - 1 - (mask.shape[1] - out.shape[1])).to(out.device)
    return out[torch.arange(len(mask), device=out.device), last]


@contextmanager
def _head_reads_last_token(model: nn.Module, mask: torch.Tensor, cols: int):
    """Inside, the LM head gets each row's last real token of the right-padded block ``mask`` only
    (``[B, 1, hidden]``) instead of the block's last ``cols`` columns: a padded batch read one column per row
    of a ``[B, cols, V]`` logits tensor (a 150k vocabulary makes it the largest tensor of the call). A forward
    pre-hook on the head gathers its input, on whatever device the input arrives (a split model's last), so
    whatever the causal LM does after the head (Gemma's logit soft-capping) still runs. Yields a list that is
    non-empty once the head ran that way (a model that computes logits without calling its head module leaves
    it empty: the caller then reads the columns as before)."""
    head = model.get_output_embeddings()
    done: list[bool] = []
    if head is None:
        yield done
        return
    last = mask.sum(-1) - 1 - (mask.shape[1] - cols)  # each row's last token among the kept columns

    def gather(module: nn.Module, args: tuple) -> tuple | None:
        hidden = args[0]
        if done or not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[1] != cols:
            return None
        done.append(True)
        index = last.to(hidden.device)[:, None, None].expand(-1, 1, hidden.shape[-1])
        return (hidden.gather(1, index), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield done
    finally:
        handle.remove()


def _check_finite(role: str, keys: list[torch.Tensor], values: list[torch.Tensor], real: torch.Tensor) -> None:
    """Refuse a segment whose real columns (each row's last ``real[i]``, every layer) hold inf/NaN; one
    device sync per agent. Pad columns are not looked at: they are masked, and a pad query whose
    sliding window holds only pads may legitimately compute garbage there. Names the cause and the
    fixes instead of letting NaN scores or empty answers through."""
    new = int(real.max())
    pad = ~left_aligned_mask(real, new).bool()[:, None, :, None]
    finite = torch.stack([(torch.isfinite(t[..., -new:, :]) | pad.to(t.device)).all().to(keys[0].device)
                          for t in (*keys, *values)])
    if not bool(finite.all()):
        layer = int((~finite).nonzero()[0]) % len(keys)
        raise NonFiniteTraceError(
            f"the {role} agent wrote non-finite values (inf/NaN) into the latent trace (layer {layer}, dtype "
            f"{keys[0].dtype}); in float16 this is an overflow: load the model in bfloat16 or float32, or set "
            "latent_dtype=float32 (stage 1 in float32), or lower latent_steps; in float64 with eager attention "
            "a padded sliding-window batch computes NaN (its softmax runs in float32): use "
            "attn_implementation=sdpa or batch size 1")


def upstream_prompt_ids(tokenizer, roles: dict[str, Role], config: LatentConfig,
                        questions: list[str]) -> list[list[list[int]]]:
    """Token ids ``[agent][row]``: each upstream role's chat-formatted prompt for each question (a function of the
    tokenizer alone, so a chain's layout can be measured without its model)."""
    return [[tokenizer(chat_format(tokenizer, roles[r].instruction, q, config.enable_thinking),
                       add_special_tokens=False)["input_ids"] for q in questions] for r in config.upstream]


def check_budget(config: LatentConfig, lengths: list[list[int]], final_tokens: list[int] | None,
                 ctx: int | None) -> None:
    """Refuse a row whose trace (``lengths[agent][row]``: each upstream prompt's tokens) exceeds
    ``max_trace_tokens``, or whose trace and final agent exceed the context ``ctx``. A function of lengths alone,
    so a grid of chains can be checked before any model is loaded (``diffmas-eval ablate``)."""
    m, limit = config.latent_steps, config.max_trace_tokens
    rows = len(lengths[0]) if lengths else len(final_tokens or [])
    for i in range(rows):
        trace = trace_positions([agent[i] for agent in lengths], m)
        detail = " + ".join(f"{r} {a[i]}+{m}" for r, a in zip(config.upstream, lengths))
        if limit is not None and trace > limit:
            raise TraceTooLongError(
                f"row {i}: the latent trace needs {trace} positions ({detail}) but max_trace_tokens={limit}; "
                "lower latent_steps or agents, shorten the question, or raise max_trace_tokens")
        used = trace_positions([a[i] for a in lengths], m, config.independent)
        total = used + (final_tokens[i] if final_tokens else 0)
        if ctx is not None and total > ctx:
            raise TraceTooLongError(
                f"row {i}: trace {used} + final agent {total - used} = {total} positions exceed the model's "
                f"context of {ctx} (max_position_embeddings); lower latent_steps, agents or max_gen_toks")


class AgentChain(nn.Module):
    def __init__(self, model: nn.Module, tokenizer, config: LatentConfig | None = None,
                 roles: dict[str, Role] | None = None, trainable_realign: bool = False):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or LatentConfig()
        self.roles = roles or TEXT_ROLES
        self.config.check_roles(self.roles)
        self.realigner = Realigner(model, self.config.realign, self.config.realign_lambda, trainable_realign,
                                    self.config.realign_target)
        self.realigner.to(self.device)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def num_layers(self) -> int:
        return self.model.config.get_text_config().num_hidden_layers

    # -- prompts ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def upstream_prompts(self, questions: list[str]) -> list[list[list[int]]]:
        """Token ids ``[agent][row]``: each upstream role's chat-formatted prompt for each question."""
        return upstream_prompt_ids(self.tokenizer, self.roles, self.config, questions)

    def final_prompt(self, question: str) -> list[int]:
        """The final agent's prompt for a bare question (``diffmas-eval ask``), as SFT trains it
        (``prompts.final_prompt_ids``: the note, then the question in a chat turn; no role instruction)."""
        return final_prompt_ids(self.tokenizer, self.config.upstream, question_prompt(self.tokenizer, question),
                                self.config.enable_thinking)

    def task_prompt(self, context: str) -> str:
        """The final agent's text for a benchmark context: the note on the trace, then the task as is."""
        return final_preamble(self.config.upstream) + context

    def _right_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and mask of a new block, each row's tokens first: they follow the row's trace directly
        (the trace's layout invariant, ``trace.py``); ``left_align`` moves the pads to the front after."""
        width = max(len(r) for r in rows)
        if width == 0:
            raise ValueError("a segment needs at least one token per row")
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows], device=self.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        return ids, mask

    # -- budget -----------------------------------------------------------------------------------
    def check_budget(self, prompts: list[list[list[int]]], final_tokens: list[int] | None = None) -> None:
        """Refuse, before any compute, a row whose trace or whole chain does not fit."""
        check_budget(self.config, [[len(r) for r in agent] for agent in prompts], final_tokens,
                     context_length(self.model))

    # -- stage 1 ----------------------------------------------------------------------------------
    def stage1(self, questions: list[str], final_tokens: list[int] | None = None,
               record: bool = False, record_inputs: bool = False) -> LatentTrace:
        """Run the upstream agents over ``questions`` and return the trace they wrote.

        ``final_tokens``: per row, what stage 2 will add (prompt + generation), for the budget check.
        ``record``: keep each segment's KV tensors for ``gradient_probe``.
        ``record_inputs``: keep what each agent fed the model (its prompt ids and latent vectors).
        """
        prompts = self.upstream_prompts(questions)
        self.check_budget(prompts, final_tokens)
        trace = LatentTrace(len(questions), self.num_layers, self.device)
        m = self.config.latent_steps
        grad = self.config.stage1_grad == "full" and torch.is_grad_enabled()
        model_dtype = self.model.get_input_embeddings().weight.dtype
        upcast = self.config.latent_dtype == "float32" and model_dtype in HALF and bool(prompts)
        if upcast and grad:
            raise ValueError("latent_dtype=float32 runs stage 1 on float32 copies of half-precision weights, without "
                             "autograd: train with latent_dtype=model (or stage1_grad=none), or load the model in "
                             "float32")
        longest = torch.zeros_like(trace.next_pos)  # independent segments: the final agent goes on after this
        with torch.set_grad_enabled(grad), (upcast_modules(self.model) if upcast else nullcontext()):
            for role, ids in zip(self.config.upstream, prompts):
                input_ids, mask = self._right_pad(ids)
                latents: list[torch.Tensor] | None = [] if record_inputs else None
                if self.config.checkpoint_agents and grad and not record_inputs:
                    keys, values = checkpoint(_agent_of(self), input_ids, mask, trace.fork(), *self._rng_anchors(),
                                              use_reentrant=False)
                else:
                    keys, values = self._agent(input_ids, mask, trace, latents)
                if record and grad:  # frozen weights: still measure d loss / d segment
                    keys, values = ([t if t.requires_grad else t.detach().requires_grad_() for t in ts]
                                    for ts in (keys, values))
                real = mask.sum(-1) + m
                _check_finite(role, keys, values, real)
                if upcast:  # stage 2 reads the trace in the model's dtype
                    keys, values = ([t.to(model_dtype) for t in ts] for ts in (keys, values))
                    latents = [x.to(model_dtype) for x in latents] if latents else latents
                trace.adopt_extended(keys, values, real)
                longest = torch.maximum(longest, real)
                trace.add_segment(Segment(role, mask.shape[1], m, real.tolist(),
                                          keys if record else None, values if record else None,
                                          [list(r) for r in ids] if record_inputs else None,
                                          torch.cat(latents, dim=1) if latents else None))
                if self.config.trace == "overwrite":
                    trace.keep_last_segment()
        if self.config.independent:
            trace.next_pos = longest
        return trace

    def _agent(self, input_ids: torch.Tensor, mask: torch.Tensor, past: LatentTrace,
               latents: list[torch.Tensor] | None = None):
        """The trace after one agent: ``past``, its prompt, then ``m`` latent thoughts (left-aligned);
        ``latents`` collects the fed vectors (``[B, 1, hidden]`` each) when given. An independent agent
        (``config.independent``) sees only its own columns, at positions from 0."""
        work = past.fork()
        own = None  # None: the agent sees the whole trace; else how many of each row's last columns are its own
        if self.config.independent:
            work.next_pos = torch.zeros_like(work.next_pos)
            own = torch.zeros_like(work.next_pos)
        hidden = self._forward(work, work.cache(), mask, own, input_ids=input_ids)
        work.left_align()
        own = None if own is None else mask.sum(-1)
        step = torch.ones(len(mask), 1, dtype=mask.dtype, device=mask.device)
        cache = work.cache(reserve=self.config.latent_steps)
        for _ in range(self.config.latent_steps):
            fed = self.realigner(hidden)[:, None]
            if latents is not None:
                latents.append(fed)
            hidden = self._forward(work, cache, step, own, inputs_embeds=fed)
            own = None if own is None else own + 1
        return work.keys, work.values

    def _forward(self, work: LatentTrace, cache, mask: torch.Tensor, own: torch.Tensor | None = None,
                 **inputs) -> torch.Tensor:
        """Extend ``work`` (through ``cache``, built from it) by one right-padded block; return the last
        layer's hidden state at each row's last real token. ``own``: the block sees only each row's last
        ``own[i]`` trace columns (an independent agent's own, contiguous there by the layout invariant)."""
        seen = work.mask if own is None else left_aligned_mask(own, work.length).to(work.mask.dtype)
        kwargs = dict(attention_mask=torch.cat([seen, mask], dim=1), position_ids=work.positions(mask), cache=cache,
                      use_cache=True)
        decoder = self._decoder()
        if decoder is None:  # no base model to listen to: ask for every layer's hidden state, read the last
            hidden = self.model(**inputs, **kwargs, logits_to_keep=1, output_hidden_states=True).hidden_states[-1]
        elif self._calls_decoder():
            hidden = decoder(**inputs, **kwargs).last_hidden_state
        else:
            hidden = self._last_hidden_state(decoder, inputs, {**kwargs, "logits_to_keep": 1})
        work.adopt(cache, mask)
        if torch.is_grad_enabled():
            layers = self._fsdp_layers()
            if layers:
                distributed.unshard_in_backward(layers, work.keys, work.values)
        return _at_last_token(hidden, mask)

    def _last_hidden_state(self, decoder: nn.Module, inputs: dict, kwargs: dict) -> torch.Tensor:
        """The decoder's ``last_hidden_state`` (after the final norm: what ``hidden_states[-1]`` holds), read by
        a hook while the chain calls the whole model as it is (so wrappers' forwards still run: DDP's reducer,
        FSDP2's root, PEFT). ``output_hidden_states=True`` would keep every layer's ``[B, T, hidden]`` alive to
        read one; the LM head runs on one column (``logits_to_keep=1``), a ``[B, V]`` that is dropped.

        The hook also hands the state on as the decoder's ``hidden_states`` (one entry, not one per layer), which
        the causal LM copies into its own output, and the chain reads it there: it must leave the called model as
        an *output*, because wrappers act on their outputs. FSDP2's root unit (final norm, embeddings) keeps its
        weights only until its post-backward, which the backward of a later latent step (whose ``inputs_embeds``
        come from this state) triggers; it gathers them again only through the pre-backward hooks it puts on its
        outputs. Read as an inner tensor, the state carried no such hook, so backward reached the final norm of
        the earlier step with the root resharded: on freed weights (SIGSEGV in the 2-process ``test_fsdp.py``)."""
        got: list[torch.Tensor] = []

        def grab(module, args, output):
            last = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            got.append(last)
            return _pass_on(output, last)

        handle = decoder.register_forward_hook(grab)
        try:
            out = self.model(**inputs, **kwargs)
        finally:
            handle.remove()
        passed = getattr(out, "hidden_states", None)
        return passed[-1] if passed else got[-1]  # a model that drops it: the hooked tensor (unwrapped models)

    def _calls_decoder(self) -> bool:
        """Whether stage 1 may call the base model (``decoder_of``) directly instead of the whole causal LM.

        Stage 1 reads hidden states only: the LM head's logits were computed and thrown away (about 8% of an 8B
        model's weight bytes per latent step, and under ``latent_dtype=float32`` a float32 copy of the head per
        step). Calling the decoder skips the head; it is what the causal LM's own forward calls first, with the
        same arguments. Not for a model the chain must call whole: a training wrapper (``CallThrough``: DDP's
        reducer, FSDP2's root act on the wrapper's outputs), FSDP2 units inside the model (the root gathers the
        embedding), or a PEFT prompt-learning adapter (its virtual tokens are added by the PEFT forward; LoRA
        layers sit inside the decoder and run either way)."""
        model = self.model
        if isinstance(model, distributed.CallThrough) or self._fsdp_layers():
            return False
        peft = getattr(model, "peft_config", None)
        return not (isinstance(peft, dict) and any(getattr(c, "is_prompt_learning", False) for c in peft.values()))

    def _decoder(self) -> nn.Module | None:
        """``decoder_of`` the model the chain calls now (the trainer swaps it per step), cached."""
        model = self.model
        if getattr(self, "_decoder_for", None) is not model:
            object.__setattr__(self, "_decoder_cache", decoder_of(model))  # not a registered submodule either
            object.__setattr__(self, "_decoder_for", model)  # a reference, not a registered submodule
        return self._decoder_cache

    def _fsdp_layers(self) -> dict[int, nn.Module]:
        """``distributed.sharded_layers`` of the model the chain calls now (the trainer swaps it per step), cached."""
        model = self.model
        if getattr(self, "_fsdp_for", None) is not model:
            self._fsdp_cache = distributed.sharded_layers(model)
            object.__setattr__(self, "_fsdp_for", model)  # a reference, not a registered submodule
        return self._fsdp_cache

    def check_devices(self, trace: LatentTrace) -> None:
        """Refuse a trace whose cache for some layer lies on another device than the one that layer runs
        on (a ``device_map`` changed, or the model moved, after stage 1): the forward would fail deep in
        attention, or copy the trace every call. Names the layer, both devices and the fix."""
        if trace.keys[0] is None:
            return
        for idx, device in self._layer_devices().items():
            if idx < len(trace.keys) and trace.keys[idx] is not None and trace.keys[idx].device != device:
                raise ValueError(
                    f"the latent trace's layer {idx} is on {trace.keys[idx].device} but the model runs layer {idx} "
                    f"on {device}: a trace lives where the layers that wrote it run. Keep one device_map (and do "
                    "not move the model) between stage 1 and stage 2, or rebuild the trace with stage1()")

    def _rng_anchors(self) -> list[torch.Tensor]:
        """One empty tensor on each device a layer runs on, passed to ``checkpoint`` as arguments: torch
        restores, for the recompute, the RNG state of the devices of its tensor arguments only (the input ids'),
        so with layers on a second GPU their dropout (LoRA's) would draw other masks in backward than in forward,
        and the gradients would silently be another step's."""
        return [torch.empty(0, device=d) for d in dict.fromkeys(self._layer_devices().values())]

    def _layer_devices(self) -> dict[int, torch.device]:
        model = self.model
        if getattr(self, "_devices_for", None) is not model:
            # the trainer's wrapper registers no submodule: its layers are the model's inside
            self._devices_cache = distributed.layer_devices(model.inner if isinstance(model, distributed.CallThrough)
                                                            else model)
            object.__setattr__(self, "_devices_for", model)  # a reference, not a registered submodule
        return self._devices_cache

    # -- stage 2 ----------------------------------------------------------------------------------
    def final_logits(self, trace: LatentTrace, rows: list[list[int]],
                     keep: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced final agent over the trace. Returns logits ``[B, K, V]`` and ``ends``: row i's
        tokens end (exclusive) at column ``ends[i]``, and its last ``keep`` columns (0: all) are
        ``logits[i, ends[i] - keep:ends[i]]``. Rows are right-padded (so they follow their trace with no
        pad in between); only the columns some row needs get logits (a 150k vocabulary makes them the
        largest tensor of the call)."""
        self.check_devices(trace)
        input_ids, mask = self._right_pad(rows)
        width, lengths = mask.shape[1], mask.sum(-1)
        cols = width if keep <= 0 else min(width, keep + width - int(lengths.min()))
        layerwise = self.config.checkpoint_final and torch.is_grad_enabled()
        with _checkpoint_layers(self.model, self._rng_anchors()) if layerwise else nullcontext():
            out = self.model(input_ids=input_ids, attention_mask=trace.full_mask(mask),
                             position_ids=trace.positions(mask), cache=trace.cache(), use_cache=True,
                             logits_to_keep=cols)
        return out.logits, lengths - (width - cols)

    def prefill(self, trace: LatentTrace, rows: list[list[int]]) -> tuple[LatentTrace, torch.Tensor]:
        """The final agent's shared prefix: ``rows`` prefilled over the trace (right-padded, then the
        trace left-aligned again), and the logits ``[B, V]`` at each row's last token. A context is
        prefilled once and every continuation, or the answer, goes on from it.

        A prefill that returns a new trace (a fork holding the trace then ``rows``); ``trace`` itself is
        left as it was, so one stage-1 trace serves many prefills."""
        self.check_devices(trace)
        work = trace.fork()
        cache = work.cache()
        ids, mask = self._right_pad(rows)
        cols = mask.shape[1] - int(mask.sum(-1).min()) + 1  # from the shortest row's last token on
        with _head_reads_last_token(self.model, mask, cols) as gathered:
            out = self.model(input_ids=ids, attention_mask=work.full_mask(mask), position_ids=work.positions(mask),
                             cache=cache, use_cache=True, logits_to_keep=cols)
        work.adopt(cache, mask)
        work.left_align()
        return work, out.logits[:, -1] if gathered else _at_last_token(out.logits, mask)

    def continuation_scores(self, trace: LatentTrace, first: torch.Tensor,
                            continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """``log p(continuation | trace)`` per row, over a trace that already holds the context
        (``prefill``; ``first``: its last logits, which predict each continuation's first token)."""
        if any(not c for c in continuations):
            raise ValueError("every continuation needs at least one token")
        logits, ends = self.final_logits(trace, continuations, max(map(len, continuations)))
        results = []
        for i, cont in enumerate(continuations):
            end = int(ends[i])  # columns end-n .. end-2 predict the continuation's tokens 2..n
            pred = F.log_softmax(torch.cat([first[i:i + 1], logits[i, end - len(cont):end - 1]]).float(), dim=-1)
            target = torch.tensor(cont, device=pred.device)
            score = pred.gather(-1, target[:, None]).sum().item()
            results.append((score, bool((pred.argmax(-1) == target).all())))
        return results

    def loglikelihood(self, trace: LatentTrace, contexts: list[list[int]],
                      continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """``log p(continuation | trace, context)`` per row, and whether it is the greedy choice."""
        if any(not c for c in continuations) or any(not c for c in contexts):
            raise ValueError("every context and continuation needs at least one token (prefix an empty "
                             "context with a BOS/EOT token, as lm-eval does)")
        prefixed, first = self.prefill(trace, contexts)
        return self.continuation_scores(prefixed, first, continuations)

    def loss(self, trace: LatentTrace, input_ids: list[list[int]], labels: list[list[int]],
             reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy over the final agent's target tokens (labels -100 elsewhere), ``mean`` or ``sum``."""
        # keep the logits from the column before each row's earliest target on
        first = [next((j for j, x in enumerate(lab) if x != -100), len(lab)) for lab in labels]
        keep = max(len(lab) - j for lab, j in zip(labels, first)) + 1
        logits, ends = self.final_logits(trace, input_ids, min(keep, max(map(len, input_ids))))
        width = logits.shape[1]
        target = torch.full((len(labels), width), -100, dtype=torch.long)
        for i, lab in enumerate(labels):
            end = int(ends[i])
            seen = lab[max(0, len(lab) - end):]
            target[i, end - len(seen):end] = torch.tensor(seen, dtype=torch.long)
        target = target.to(logits.device)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target[:, 1:].flatten(), ignore_index=-100,
                               reduction=reduction)

    @torch.no_grad()
    def generate(self, trace: LatentTrace, prompts: list[list[int]], max_new_tokens: int = 256,
                 stop: list[str] | None = None, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None,
                 ignore_eos: bool = False) -> list[Generation]:
        """Decode the final agent's answer over the trace; a row ends at EOS (unless ``ignore_eos``: fixed
        budgets for benchmarks) or at a stop string. Each answer's ``stats`` come from the logits this loop
        computes anyway (the model's distribution before the sampling warpers), so they change no token."""
        stop = [s for s in (stop or []) if s]
        ctx = context_length(self.model)
        if ctx is not None and prompts:  # before any compute: a budget past the context would fail mid-answer
            need = [int(p) + len(r) + max_new_tokens for p, r in zip(trace.next_pos.tolist(), prompts)]
            i = max(range(len(need)), key=need.__getitem__)
            if need[i] > ctx:
                raise TraceTooLongError(
                    f"row {i}: trace {need[i] - len(prompts[i]) - max_new_tokens} + final prompt {len(prompts[i])} + "
                    f"max_new_tokens {max_new_tokens} = {need[i]} positions exceed the model's context of {ctx} "
                    "(max_position_embeddings); lower max_new_tokens (max_gen_toks), latent_steps or agents")
        eos = set() if ignore_eos else eos_ids(self.model, self.tokenizer)
        warpers = LogitsProcessorList(
            ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
            + ([TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []))
        # prefill the final agent's prompt (right-padded, then left-aligned), then decode one column per row
        work, logits = self.prefill(trace, prompts)
        # decoding writes in place into buffers that grow as they fill (O(1) bytes moved per token, no budget
        # reserved up front); the prefilled fork hands its tensors over, so they are not held twice
        cache = work.decode_cache(max_new_tokens)
        step = torch.ones(len(prompts), 1, dtype=work.mask.dtype, device=work.mask.device)
        # every token and its statistics stay on the device until the host reads them, in chunks (``_Answers``);
        # the buffers hold one chunk, so nothing here scales with max_new_tokens either
        device, rows = logits.device, len(prompts)
        width = min(SYNC_EVERY, max_new_tokens)
        tokens = torch.empty(rows, width, dtype=torch.long, device=device)
        logps = torch.empty(rows, width, dtype=torch.float32, device=device)
        ents = torch.empty(rows, width, dtype=torch.float32, device=device)
        answers = _Answers(rows, eos, stop, self.tokenizer)
        rng = (generator or _default_generator(device)) if do_sample else None
        # which rows have not met EOS (nor, as of the last read, a stop string): read every step, one bool, so the
        # loop runs no forward after the batch is done (HF ``generate`` syncs as often); EOS ignored: never needed
        ends = torch.tensor(sorted(eos), dtype=torch.long, device=device) if eos else None
        unfinished = torch.ones(rows, dtype=torch.bool, device=device)
        states: list[torch.Tensor] = []  # the sampler's state after each unread step, to undo steps past the end
        read = 0
        for n in range(max_new_tokens):
            logits = logits.float()
            if do_sample:
                probs = F.softmax(warpers(None, logits), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
                states.append(rng.get_state())
            else:
                nxt = logits.argmax(-1)
            tokens[:, n - read] = nxt
            logps[:, n - read], ents[:, n - read] = step_stats(logits, nxt)  # the model's distribution, pre-warper
            made = n + 1
            done = False
            if ends is not None:
                unfinished &= ~torch.isin(nxt, ends)
                done = not bool(unfinished.any())
            if done or made == max_new_tokens or made - read >= min(SYNC_EVERY, max(1, made // 4)):
                last = answers.read(tokens[:, :made - read].tolist(), logps[:, :made - read].tolist(),
                                    ents[:, :made - read].tolist(), read)
                if last is not None and states:  # sampling: leave the generator as the step that ended it left it
                    rng.set_state(states[last - read])
                states.clear()
                read = made
                if last is not None:
                    break
                if ends is not None and stop:  # rows a stop string ended count as done for the flag too
                    unfinished &= torch.tensor([d is None for d in answers.done_at], device=device)
            if made == max_new_tokens:
                break
            out = self.model(input_ids=nxt[:, None], attention_mask=work.full_mask(step),
                             position_ids=work.positions(step), cache=cache, use_cache=True, logits_to_keep=1)
            work.advance(step)
            logits = out.logits[:, -1]
        return [Generation(cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), stop), ids,
                           AnswerStats(lp, en, how))
                for ids, lp, en, how in zip(answers.ids, answers.logps, answers.ents, answers.ended)]

    # -- diagnostics ------------------------------------------------------------------------------
    def gradient_probe(self, questions: list[str], input_ids: list[list[int]],
                       labels: list[list[int]]) -> list[tuple[str, float]]:
        """Per upstream agent: the norm of d loss / d (its KV segment), all layers, all rows.

        Total derivative: through the final agent's attention and through every later agent.
        """
        with torch.enable_grad():
            trace = self.stage1(questions, record=True)
            loss = self.loss(trace, input_ids, labels)
            tensors = [t for s in trace.history for t in (*(s.keys or []), *(s.values or []))]
            live = [t for t in tensors if t.requires_grad]
            grads = dict(zip(map(id, live), torch.autograd.grad(loss, live, allow_unused=True))) if live else {}
        norms = []
        for s in trace.history:  # the segment is each row's last s.real[i] columns of the trace after it
            sq = 0.0
            for t in (*(s.keys or []), *(s.values or [])):
                g = grads.get(id(t))
                if g is not None:
                    cols = left_aligned_mask(torch.tensor(s.real, device=g.device), g.shape[-2])
                    sq += float((g.float() * cols[:, None, :, None]).pow(2).sum())
            norms.append((s.agent, sq ** 0.5))
        return norms
