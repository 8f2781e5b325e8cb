"""The TextMAS+SFT set: an SFT set whose prompts carry the notes the untrained text agents write for them.

TextMAS+SFT (the DiffMAS paper's ablation) trains the text multi-agent system the way DiffMAS is trained:
the final agent learns the answer over what its upstream agents wrote. The upstream agents are the untrained
model, so their notes are fixed: they are written once per SFT row and cached, and the final agent is then
LoRA-trained (``trainers/sft.py --agents 1``) on ``note + prompt -> completion``. The note and where it goes
are ``textmas``'s own (``TextMASLM.final_context``: the note before the task's text, inside the last user turn
under a chat template), so the trained agent reads at evaluation exactly what it read in training.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from ..harness.textmas_lm import TextMASLM
from .trainer import question_of, with_note


def write_notes_set(source: Path, out: Path, model_args: dict, batch_size: int = 8) -> Path:
    """``source``'s rows with the upstream notes before each prompt, written to ``out`` (kept if it is there:
    the caller names it by a hash of ``source`` and ``model_args``)."""
    if out.exists():
        return out

    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    bad = [i for i, r in enumerate(rows, 1) if not isinstance(r.get("prompt"), (str, list)) or not r["prompt"]]
    if bad:
        raise ValueError(f"{source}: rows {bad[:5]} have no prompt; TextMAS+SFT needs prompt/completion rows")
    lm = TextMASLM(**model_args, batch_size=batch_size)

    def final(prompt, trace):  # chat rows: the note in the last user turn, as final_context puts it there
        return lm.final_context(prompt, trace) if isinstance(prompt, str) else with_note(prompt, trace.preamble())

    tmp = out.with_suffix(".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w") as f, tqdm(total=len(rows), desc="textmas-sft notes") as bar:
        for b0 in range(0, len(rows), batch_size):
            chunk = rows[b0:b0 + batch_size]
            traces = lm.chain.run([lm.question(r["prompt"]) if isinstance(r["prompt"], str)
                                   else question_of(r["prompt"]) for r in chunk])
            for r, trace in zip(chunk, traces):
                f.write(json.dumps({**r, "prompt": final(r["prompt"], trace)}) + "\n")
            bar.update(len(chunk))
    tmp.replace(out)  # whole or absent: an interrupted run writes it again
    return out
