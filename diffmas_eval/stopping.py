"""Where an answer ends, defined once: lm-eval's stop strings and the model's end-of-sequence ids.

The in-process chain (``latent/chain.py``), the text MAS's in-process backend and the servers' answers
(``serving/client.py``, ``serving/stage2_vllm.py``) all cut and stop by these, so the same answer reads the same
whichever of them produced it.
"""

from __future__ import annotations


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """lm-eval's convention: the text before the first occurrence of any stop string (empty ones ignored)."""
    for s in stop or []:
        if s:
            text = text.split(s)[0]
    return text


ENDINGS = ("eos", "stop", "length")  # how an answer ended (``stability.AnswerStats.stopped``)


def stop_hit(text: str, stop: list[str] | None) -> bool:
    """Whether ``text`` holds one of the stop strings (empty ones ignored): the answer ended there."""
    return any(s in text for s in stop or [] if s)


def ending(eos: bool, stop: bool) -> str:
    """How an answer ended, decided once for every path (the chain's decoding, the text MAS's ``generate`` rows, a
    server's ``finish_reason``): ``eos`` when the model ended it, else ``stop`` when a stop string did, else
    ``length`` (it ran into its token cap)."""
    return "eos" if eos else "stop" if stop else "length"


def eos_ids(model, tokenizer) -> set[int]:
    """The ids that end a generation: the tokenizer's EOS and every id of the model's generation config (chat
    models end a turn with a token other than the tokenizer's EOS, e.g. ``<|im_end|>``)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, list) else {gen_eos}
    return {i for i in ids if i is not None}
