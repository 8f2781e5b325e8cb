"""``lm_eval --model diffmas``: the DiffMAS chain behind lm-eval's LM interface.

A thin adapter: HFLM loads the model and tokenizer and tokenizes requests exactly as ``hf`` does;
this class only routes each request through the chain. Upstream agents read the task's question
(the context before chat formatting); the final agent reads the trace, a one-line note about it,
and then the context exactly as the task formatted it. With ``agents=1`` there is no trace and no
note, so the final agent sees exactly what ``--model hf`` sees (the tests use ``hf`` as the oracle).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from lm_eval import utils
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from ..latent import AgentChain, LatentConfig
from ..latent.persist import load_chain_config
from ..models import resolve_pretrained
from ..prompts import ROLES, default_roles, final_preamble, last_user_turn, load_roles
from .common import Accounting, check_model_args, group_by_gen_kwargs, join_data_parallel

OPTIONS = {
    "pretrained": "hub id, local path or bundled:NAME",
    "peft": "path of a PEFT adapter (e.g. the output_dir of trainers/sft.py)",
    "agents": "number of agents, final agent included (default 4: planner, critic, refiner, solver)",
    "latent_steps": "latent thoughts per upstream agent (default 10)",
    "realign": "ridge | identity | none",
    "trace": "concat | overwrite",
    "roles": "YAML file 'role: instruction', in agent order; the last one is the final agent",
    "dtype": "auto | float32 | bfloat16 | float16",
    "device": "cuda, cuda:N or cpu (default: cuda if available)",
    "batch_size": "questions per batch (an integer)",
    "max_batch_size": "accepted for lm-eval compatibility",
    "max_trace_tokens": "refuse a latent trace longer than this",
    "max_length": "model context in tokens (default: from the model config)",
    "enable_thinking": "passed to the chat template (Qwen3)",
    "trust_remote_code": "passed to from_pretrained",
}


class DiffMASLM(HFLM):
    def __init__(self, pretrained: str = "bundled:smollm2-135m-instruct", peft: str | None = None,
                 agents: int | None = None, latent_steps: int | None = None, realign: str | None = None,
                 trace: str | None = None, roles: str | None = None, dtype: str = "auto",
                 device: str | None = None, batch_size: int | str = 1, max_batch_size: int | None = 64,
                 max_trace_tokens: int | None = None, max_length: int | None = None,
                 enable_thinking: bool | None = None, trust_remote_code: bool = False, **unknown) -> None:
        check_model_args("diffmas", unknown, OPTIONS)
        if not str(batch_size).isdigit():
            raise ValueError(f"diffmas needs an integer batch_size (got {batch_size!r}), e.g. --batch_size 8")
        # explicit model_args > the chain saved beside a trained adapter/model (trainers/sft.py) > defaults
        saved, realign_file = load_chain_config(peft, None if pretrained.startswith("bundled:") else pretrained)
        role_map, order = dict(ROLES), saved.get("roles", default_roles(4))
        if agents is not None:
            order = default_roles(int(agents))
        if roles:
            role_map, order = load_roles(roles)
            if agents is not None and int(agents) != len(order):
                raise ValueError(f"agents={agents} but the roles file {roles} defines {len(order)} agents")
        pick = {"latent_steps": latent_steps, "realign": realign, "trace": trace}
        options = {k: saved.get(k) if v is None else v for k, v in pick.items()}
        config = LatentConfig(roles=order, max_trace_tokens=max_trace_tokens, enable_thinking=enable_thinking,
                              **{k: v for k, v in options.items() if v is not None})
        config.latent_steps = int(config.latent_steps)
        config.check_roles(role_map)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        super().__init__(pretrained=resolve_pretrained(pretrained), peft=peft, dtype=dtype, device=device,
                         batch_size=int(batch_size), max_batch_size=max_batch_size, max_length=max_length,
                         enable_thinking=enable_thinking, trust_remote_code=trust_remote_code)
        self.chain = AgentChain(self.model, self.tokenizer, config, role_map)
        if realign_file is not None and config.realign == saved.get("realign"):  # a realignment trained with SFT
            self.chain.realigner.weight.data.copy_(torch.load(realign_file, map_location=self.device))
        self._preamble = final_preamble(config.upstream)
        self._chat_questions: dict[str, str] = {}
        self.accounting = Accounting("diffmas")
        join_data_parallel(self)

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
        messages[last_user]["content"] = self._preamble + question
        text = super().apply_chat_template(messages, add_generation_prompt)
        self._chat_questions[text] = question
        return text

    def _question(self, context: str) -> str:
        return self._chat_questions.get(context, context)

    def _final_ids(self, context: str, context_ids: list[int]) -> list[int]:
        """The final agent's tokens: the note on the trace (unless already in the chat turn), then the context."""
        if not self._preamble or context in self._chat_questions:
            return list(context_ids)
        note = self.tok_encode(self._preamble, add_special_tokens=False)
        bos = self.tokenizer.bos_token_id
        if context_ids and bos is not None and context_ids[0] == bos:
            return [bos, *note, *context_ids[1:]]
        return note + list(context_ids)

    # -- accounting -------------------------------------------------------------------------------
    def _agents_log(self, final_tokens: int) -> list[dict]:
        """Upstream agents write latent steps, not tokens; the final agent's generated tokens."""
        steps = self.chain.config.latent_steps
        return [{"role": r, "tokens": 0, "latent_steps": steps} for r in self.chain.config.upstream] + [
            {"role": self.chain.config.roles[-1], "tokens": final_tokens}]

    def get_model_info(self) -> dict:
        return {**super().get_model_info(), "accounting": self.accounting.summary()}

    # -- scoring ----------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        t0 = time.perf_counter()
        results = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        by_question: dict[str, list] = defaultdict(list)
        for req in requests:
            by_question[self._question(req.args[0])].append(req)
        per = (time.perf_counter() - t0) / max(1, len(by_question))  # one trace per question
        for first, *rest in by_question.values():
            record = self.accounting.record(first, self._agents_log(0), per)
            for req in rest:
                self.accounting.register(req, record)
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        items = [(self._question(ctx), self._final_ids(ctx, ctx_ids), cont_ids)
                 for (ctx, _), ctx_ids, cont_ids in requests]
        results = self._score(items, disable_tqdm)
        for (key, _, _), res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    @torch.no_grad()
    def _score(self, items: list[tuple[str, list[int], list[int]]], disable_tqdm: bool = False,
               desc: str = "diffmas loglikelihood") -> list[tuple[float, bool]]:
        """One trace per distinct question, shared by all of that question's continuations."""
        by_question: dict[str, list[int]] = defaultdict(list)
        for i, (question, _, _) in enumerate(items):
            by_question[question].append(i)
        questions = list(by_question)
        results: list[tuple[float, bool] | None] = [None] * len(items)
        bs = self.batch_size
        with tqdm(total=len(items), disable=disable_tqdm or self.rank != 0, desc=desc) as bar:
            for q0 in range(0, len(questions), bs):
                chunk = questions[q0:q0 + bs]
                need = [max(len(items[i][1]) + len(items[i][2]) for i in by_question[q]) for q in chunk]
                trace = self.chain.stage1(chunk, final_tokens=need)
                pairs = [(row, i) for row, q in enumerate(chunk) for i in by_question[q]]
                for p0 in range(0, len(pairs), bs):
                    part = pairs[p0:p0 + bs]
                    sub = trace.select([row for row, _ in part])
                    scores = self.chain.loglikelihood(sub, [items[i][1] for _, i in part],
                                                      [items[i][2] for _, i in part])
                    for (_, i), res in zip(part, scores):
                        results[i] = res
                    bar.update(len(part))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity of a document by the final agent, over a trace the upstream agents built from it."""
        out = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm or self.rank != 0,
                              desc="diffmas loglikelihood_rolling"):
            with torch.no_grad():
                used = int(self.chain.stage1([string]).next_pos.max()) if self.chain.config.upstream else 0
            note = self._final_ids("", []) if self._preamble else []
            windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length - used - len(note), context_len=1))
            items = [(string, note + ctx, cont) for ctx, cont in windows]
            total = sum(score for score, _ in self._score(items, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # -- generation -------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups = group_by_gen_kwargs(requests)
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
            for b0 in range(0, len(indices), self.batch_size):
                batch = indices[b0:b0 + self.batch_size]
                t0 = time.perf_counter()
                contexts = [requests[i].args[0] for i in batch]
                finals = [self._final_ids(c, self.tok_encode(c)) for c in contexts]
                with torch.no_grad():
                    trace = self.chain.stage1([self._question(c) for c in contexts],
                                              final_tokens=[len(f) + max_gen for f in finals])
                gens = self.chain.generate(trace, finals, max_new_tokens=max_gen, stop=until, **sampling)
                per = (time.perf_counter() - t0) / len(batch)
                for i, gen in zip(batch, gens):
                    results[i] = gen.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, gen.text)
                    self.accounting.record(requests[i], self._agents_log(len(gen.token_ids)), per)
                bar.update(len(batch))
        bar.close()
        return results
