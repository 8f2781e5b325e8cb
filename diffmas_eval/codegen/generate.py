"""Generate EvalPlus samples with any lm-eval model, through that model's own batched ``generate_until``.

The prompt is EvalPlus's instruction prompt for chat models (``evalplus.codegen.run_codegen``'s
instruction/response prefixes, laid out as ``evalplus.provider.utility.make_raw_chat_prompt`` does): a
user turn asking for a script, and the assistant's answer opened with a prefix and a python code fence,
rendered by the lm-eval model's ``apply_chat_template`` (``continue_final_message``). So ``diffmas`` and
``textmas`` see a chat turn exactly as with lm-eval's ``--apply_chat_template``: their upstream agents
get the bare user turn, the final agent the whole chat and writes the program. A tokenizer without a
chat template gets EvalPlus's direct-completion prompt (the bare code prompt) instead. The output is cut
at EvalPlus's stop strings, tabs become four spaces, and ``evalplus.sanitize`` extracts the program.
"""

from __future__ import annotations

import time

from lm_eval.api.instance import Instance
from tqdm import tqdm

from ..extras import require
from .data import task_prompt

# evalplus.codegen.run_codegen (0.3.1), the default "instruct" prompt
INSTRUCTION_PREFIX = ("Please provide a self-contained Python script that solves the following problem "
                      "in a markdown code block:")
RESPONSE_PREFIX = ("Below is a Python script with a self-contained function that solves the problem and "
                   "passes corresponding tests:")
TOP_P = 0.95  # EvalPlus's HF provider samples with top_p 0.95


def is_chat(lm) -> bool:
    return bool(getattr(getattr(lm, "tokenizer", None), "chat_template", None))


def build_prompt(lm, dataset: str, task: dict) -> str:
    """The model's input for one task (see the module docstring)."""
    code = task_prompt(task)
    if not is_chat(lm):
        return code
    messages = [{"role": "user", "content": f"{INSTRUCTION_PREFIX}\n```\n{code.strip()}\n```\n"},
                {"role": "assistant", "content": f"{RESPONSE_PREFIX}\n```python\n"}]
    return lm.apply_chat_template(messages, add_generation_prompt=False)


def gen_kwargs(lm, dataset: str, max_new_tokens: int, temperature: float) -> dict:
    """lm-eval generation kwargs with EvalPlus's stop strings and sampling settings."""
    require("evalplus")
    from evalplus.provider.utility import EOS, extra_eos_for_direct_completion  # optional extra: codegen

    until = [*EOS, "\n```\n"] if is_chat(lm) else [*EOS, *extra_eos_for_direct_completion(dataset)]
    kwargs = {"until": until, "max_gen_toks": int(max_new_tokens), "do_sample": temperature > 0,
              "temperature": float(temperature)}
    if temperature > 0:
        kwargs["top_p"] = TOP_P
    return kwargs


def to_solution(lm, task: dict, output: str) -> tuple[str, str]:
    """``(raw, sanitized)`` as ``evalplus.codegen`` stores them."""
    require("evalplus")
    from evalplus.sanitize import sanitize  # optional extra: codegen

    raw = output.replace("\t", "    ")
    if not is_chat(lm):  # direct completion: the program is the prompt plus its continuation
        raw = task_prompt(task) + raw
    return raw, sanitize(raw, entrypoint=task["entry_point"])


def _chunks(todo: list[tuple[int, dict, int]], batch_size: int) -> list[list[tuple[int, dict, int]]]:
    """Whole tasks per chunk, about ``batch_size`` requests each (a task's samples stay together)."""
    chunks, current, size = [], [], 0
    for item in todo:
        if current and size + item[2] > batch_size:
            chunks.append(current)
            current, size = [], 0
        current.append(item)
        size += item[2]
    return chunks + ([current] if current else [])


def generate(lm, dataset: str, tasks: list[dict], need: dict[str, int], out, batch_size: int,
             max_new_tokens: int, temperature: float, method: str) -> int:
    """Generate ``need[task_id]`` samples per task, writing each batch to ``out`` (a ``SampleDir``)."""
    kwargs = gen_kwargs(lm, dataset, max_new_tokens, temperature)
    todo = [(i, t, need[t["task_id"]]) for i, t in enumerate(tasks) if need.get(t["task_id"], 0) > 0]
    accounting = getattr(lm, "accounting", None)
    done = 0
    with tqdm(total=sum(n for _, _, n in todo), desc=f"codegen {dataset} ({method})") as bar:
        for chunk in _chunks(todo, batch_size):
            prompts = {i: build_prompt(lm, dataset, t) for i, t, _ in chunk}
            requests = [Instance("generate_until", t, (prompts[i], dict(kwargs)), k, (dataset, i, 1))
                        for i, t, n in chunk for k in range(n)]
            seen = len(accounting.records) if accounting is not None else 0
            t0 = time.perf_counter()
            outputs = lm.generate_until(requests, disable_tqdm=True)
            per = (time.perf_counter() - t0) / len(requests)
            records = accounting.records[seen:] if accounting is not None else []
            rows = []
            for j, (req, output) in enumerate(zip(requests, outputs)):
                raw, solution = to_solution(lm, req.doc, output)
                if len(records) == len(requests):  # diffmas / textmas: the model's own per-sample record
                    rec = records[j]
                    acc = {"method": method, "agents": rec["agents"], "tokens": rec["tokens"],
                           "seconds": rec["seconds"]}
                else:  # a plain lm-eval model: one agent; its output's tokens, the batch's time per sample
                    n = len(lm.tok_encode(output)) if hasattr(lm, "tok_encode") else None
                    acc = {"method": method, "agents": [{"role": "model", "tokens": n}], "tokens": n or 0,
                           "seconds": round(per, 4)}
                rows.append({"task_id": req.doc["task_id"], "solution": solution, "raw": raw, "accounting": acc})
            out.write(rows)
            done += len(rows)
            bar.update(len(rows))
    return done
