"""Decoding stability (DiffMAS paper, "decoding stability" beside accuracy), defined once.

Per generated answer, under the model that wrote it (the final agent over its trace for ``diffmas``,
over the text notes for ``textmas``, the model alone at ``agents=1``):

- ``logprobs[t]``: log p(answer token t | everything before it), from the model's own next-token
  distribution *before* temperature / top-k / top-p (the model's distribution, not the sampler's);
- ``mean_logprob`` = mean_t logprobs[t]; ``perplexity`` = exp(-mean_logprob);
- ``entropies[t]``: H(p(. | prefix)) in nats at answer position t, from the same distribution;
  ``mean_entropy`` its mean (the per-position values make the entropy-along-the-answer curve);
- ``stopped``: ``eos`` (the model ended it), ``stop`` (a stop string did) or ``length`` (it ran into
  the token cap).

The answer's tokens are the ones the decoder kept: a stop string's tokens are in, the EOS token is
not (it ends the answer, it is not part of it). Everything comes from the logits decoding computed
anyway (``step_stats`` per decoding step), so measuring changes no answer and costs no forward pass.

Repeated samples (k per question, lm-eval ``repeats``): ``sample_metrics`` turns one question's k
correctness flags into its pass@1 mean, the paper's "consistent" flag (at least ceil(3k/4) correct:
3-4 of 4) and the one-hot count of correct samples; averaged over questions by lm-eval, those are the
mean pass@1 with its stderr, the share of consistently solved questions, and the distribution of
"correct samples out of k". The majority-vote answer is lm-eval's ``majority_vote`` filter's.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from .stopping import ending

STOPS = ("eos", "stop", "length")


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Per row, ``H = -sum p log p`` in nats, from the log-probabilities ``logp`` ``[B, V]`` it is given: one
    ``exp`` over the vocabulary and no logarithm (``entr(exp(logp))`` took V logarithms again, of numbers whose
    logarithms it had). A -inf log-probability (p = 0) adds 0, not ``0 * -inf`` = NaN; a NaN row stays NaN."""
    p = logp.exp()
    return torch.where(p == 0, 0.0, -p * logp).sum(-1)  # terms of +0.0 where p = 0: a certain answer has H = +0.0


def step_stats(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of one decoding step: log p(chosen token) and the entropy (nats) of ``softmax(logits)``.

    ``logits`` ``[B, V]`` before any sampling warper, ``tokens`` ``[B]``; computed in float32 from one
    ``log_softmax`` (``entropy``). A logit a processor set to -inf has probability 0 and adds 0 to the entropy."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens.to(logp.device)[:, None].long())[:, 0]
    return chosen, entropy(logp)


@dataclass
class AnswerStats:
    """One answer's per-token log-probabilities and entropies, and how it ended."""

    logprobs: list[float]
    entropies: list[float]
    stopped: str

    def __post_init__(self) -> None:
        if self.stopped not in STOPS:
            raise ValueError(f"stopped={self.stopped!r}; one of {', '.join(STOPS)}")

    @property
    def mean_logprob(self) -> float | None:
        return statistics.fmean(self.logprobs) if self.logprobs else None

    @property
    def perplexity(self) -> float | None:
        m = self.mean_logprob
        return None if m is None else math.exp(-m)

    @property
    def mean_entropy(self) -> float | None:
        return statistics.fmean(self.entropies) if self.entropies else None

    def record(self) -> dict:
        """What the sample log keeps (``--log_samples``: ``diffmas_accounting.stability``)."""
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 6)

        return {"tokens": len(self.logprobs), "mean_logprob": r(self.mean_logprob), "perplexity": r(self.perplexity),
                "mean_entropy": r(self.mean_entropy), "stopped": self.stopped,
                "entropy": [round(e, 4) for e in self.entropies]}


def server_stats(logprobs: list[float] | None, keep: list[bool], finish_reason: str | None,
                 stop_reason: str | int | None) -> AnswerStats | None:
    """An answer's stats from an OpenAI-compatible server's sampled-token log-probabilities (``logprobs=0``:
    vLLM reports them from the model's raw distribution, before temperature and top-p, as ``step_stats``
    does). ``keep``: which generated tokens are the answer's (False for the EOS token; the caller knows its
    ids). No entropies: a server returns at most its top-k log-probabilities per position, and the entropy of
    that truncated distribution understates the model's, so it is left out rather than approximated. None
    where the server gave no log-probabilities or did not say why it stopped."""
    if logprobs is None or finish_reason not in ("stop", "length"):
        return None
    ended = finish_reason == "stop"  # else "length": the token cap
    stopped = ending(eos=ended and not isinstance(stop_reason, str), stop=ended and isinstance(stop_reason, str))
    return AnswerStats([float(v) for v, k in zip(logprobs, keep) if k], [], stopped)


def served_record(completion, eos_ids: set[int], tokenizer) -> dict | None:
    """The sample log's stability record of a server's answer (``serving.Completion`` asked with logprobs=0),
    or None. A token is the EOS (not part of the answer) when its text is an EOS token's, or, for token ids
    (vLLM's ``return_tokens_as_token_ids``), its id is."""
    if completion.logprobs is None:
        return None
    eos_texts = {tokenizer.convert_ids_to_tokens(i) for i in eos_ids if i is not None}
    eos_texts |= {tokenizer.decode([i], skip_special_tokens=False) for i in eos_ids if i is not None}

    def is_eos(text: str) -> bool:
        if text.startswith("token_id:") and text[9:].isdigit():
            return int(text[9:]) in eos_ids
        return text in eos_texts

    stats = server_stats(completion.logprobs, [not is_eos(t) for t in completion.token_texts],
                         completion.finish_reason, completion.stop_reason)
    return stats.record() if stats else None


def _mean_se(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else None
    return round(statistics.fmean(xs), 6), None if se is None else round(se, 6)


def summarise(records: list[dict]) -> dict:
    """Means over answers (``AnswerStats.record()`` dicts) with their stderr, stop shares, the entropy curve.

    Answers with no token (an immediate EOS) count in the stop shares, not in the means. The curve's
    point t is the mean entropy over the answers that reached position t (``entropy_curve_n`` of them)."""
    out: dict = {"answers": len(records)}
    for key in ("mean_logprob", "perplexity", "mean_entropy"):
        out[key], out[f"{key}_stderr"] = _mean_se([r[key] for r in records if r.get(key) is not None])
    stops = Counter(r["stopped"] for r in records)
    out["stopped"] = {s: round(stops[s] / len(records), 6) if records else None for s in STOPS}
    curve: list[list[float]] = []
    for r in records:
        for t, e in enumerate(r.get("entropy") or []):
            if t == len(curve):
                curve.append([])
            curve[t].append(e)
    out["entropy_curve"] = [round(statistics.fmean(c), 5) for c in curve]
    out["entropy_curve_n"] = [len(c) for c in curve]
    return out


class StepRecorder(LogitsProcessor):
    """Records ``step_stats`` inside ``model.generate`` without changing the scores it is handed.

    Passed as ``logits_processor``, transformers runs it after the model's own processors and before
    the sampling warpers (temperature, top-k, top-p are appended after the custom list), so it sees the
    distribution ``AgentChain.generate`` measures. Only the previous step's log-probabilities are kept
    (the token chosen from them is known one call later, or from the final sequences): O(B x V) memory,
    not O(steps x B x V) as ``output_logits`` would hold."""

    def __init__(self) -> None:
        self.logprobs: list[torch.Tensor] = []
        self.entropies: list[torch.Tensor] = []
        self._last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._last is not None:
            self._take(input_ids[:, -1])
        logp = torch.log_softmax(scores.float(), dim=-1)
        self.entropies.append(entropy(logp))
        self._last = logp
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        self.logprobs.append(self._last.gather(-1, tokens.to(self._last.device)[:, None].long())[:, 0])
        self._last = None

    def finish(self, sequences: torch.Tensor) -> tuple[list[list[float]], list[list[float]]]:
        """Per row: log-probabilities and entropies of every generated column (pads of finished rows too)."""
        if self._last is not None:
            self._take(sequences[:, -1])
        if not self.entropies:
            return [[] for _ in range(len(sequences))], [[] for _ in range(len(sequences))]
        return torch.stack(self.logprobs, 1).tolist(), torch.stack(self.entropies, 1).tolist()


def sample_metrics(correct: list[bool | int]) -> dict[str, float]:
    """One question's metrics from its k samples' correctness (the lm-eval per-doc values).

    ``exact_match``: the share of correct samples (its mean over questions is the mean pass@1);
    ``consistent``: 1 if at least ceil(3k/4) samples are correct (the paper's 3-4 of 4);
    ``correct_{j}of{k}``: 1 for the j that is this question's count of correct samples."""
    k = len(correct)
    if k < 1:
        raise ValueError("no samples to score")
    c = sum(bool(x) for x in correct)
    out = {"exact_match": c / k, "consistent": int(c >= math.ceil(3 * k / 4))}
    out.update({f"correct_{j}of{k}": int(c == j) for j in range(k + 1)})
    return out


def consistency_table(per_question: list[list[bool | int]]) -> dict:
    """Self-consistency of a constructed or collected result set: per question a list of k correctness
    flags. Returns the mean pass@1, the share of consistent questions and the count distribution."""
    if not per_question:
        raise ValueError("no questions")
    ks = {len(q) for q in per_question}
    if len(ks) != 1:
        raise ValueError(f"every question needs the same number of samples, got {sorted(ks)}")
    rows = [sample_metrics(q) for q in per_question]
    (k,) = ks
    return {"k": k, "questions": len(rows), "pass@1": statistics.fmean(r["exact_match"] for r in rows),
            "consistent": statistics.fmean(r["consistent"] for r in rows),
            "correct_of_k": {j: sum(r[f"correct_{j}of{k}"] for r in rows) for j in range(k + 1)}}
