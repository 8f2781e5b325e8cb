"""The final agent on a real vLLM against in process, and text MAS on vLLM against ``backend=hf``.

One process, the same questions and budgets, a vLLM CPU server (``serving/vllm_cpu.py``) started here on
the same bundled model in float32; EOS is ignored so every answer is exactly its budget:

- stage 2: the final agent's decoding over a DiffMAS trace (4 agents, ``--latent-steps``), in process
  (``chain.generate``, batched) against ``stage2=vllm`` (the trace as prompt embeddings, requests in flight
  at once), at batch 1 and ``--batch``: seconds per question and per generated token, and their ratio;
- text MAS: ``textmas`` with 3 agents, ``backend=openai`` on vLLM (``num_concurrent`` = batch) against
  ``backend=hf`` (``model.generate`` batched), whole questions.

On this 2-core machine vLLM holds one core while it works and the in-process model the other (torch
threads are set to 1 for the in-process side so the two do not fight): the ratios say how the two
compare on equal footing here, not what a GPU gives.

    python benchmarks/vllm.py --questions 8 --new-tokens 32 --batch 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from lm_eval.api.instance import Instance

from diffmas_eval import DEFAULT_MODEL
from diffmas_eval.harness.textmas_lm import TextMASLM
from diffmas_eval.latent import AgentChain, LatentConfig
from diffmas_eval.models import load_model, resolve_pretrained
from diffmas_eval.serving.stage2_vllm import PromptEmbedsBackend, trace_embeddings
from diffmas_eval.serving.vllm_cpu import VLLMServer

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from latency import gsm8k  # noqa: E402 - same questions as the other benchmarks


def stage2(chain: AgentChain, backend: PromptEmbedsBackend, questions: list[str], batch: int, new: int) -> dict:
    """Seconds for the final agent's answers of ``questions`` in batches of ``batch``, in process and on vLLM."""
    times = {"hf": 0.0, "vllm": 0.0}
    tokens = {"hf": 0, "vllm": 0}
    backend.num_concurrent = batch
    for b0 in range(0, len(questions), batch):
        chunk = questions[b0:b0 + batch]
        with torch.no_grad():
            trace = chain.stage1(chunk, record_inputs=True)
            finals = [chain.final_prompt(q) for q in chunk]
            t0 = time.perf_counter()
            gens = chain.generate(trace, finals, max_new_tokens=new, ignore_eos=True)
            times["hf"] += time.perf_counter() - t0
            tokens["hf"] += sum(len(g.token_ids) for g in gens)
            t0 = time.perf_counter()
            rows = trace_embeddings(chain.model, trace, finals)
            outs = backend.map(lambda r: backend.complete_embeds(r, new, extra_body={"ignore_eos": True}), rows)
            times["vllm"] += time.perf_counter() - t0
            tokens["vllm"] += sum(o.tokens or 0 for o in outs)
    n = len(questions)
    return {"batch": batch, **{f"{k}_s_per_q": times[k] / n for k in times},
            **{f"{k}_s_per_token": times[k] / max(1, tokens[k]) for k in times},
            "tokens_per_q": tokens["hf"] / n, "vllm_tokens_per_q": tokens["vllm"] / n}


def textmas(path: str, url: str, questions: list[str], batch: int, agent_tokens: int, new: int) -> dict:
    reqs = [Instance("generate_until", {}, (f"Question: {q}\nAnswer:", {"until": [], "max_gen_toks": new}), i,
                     ("gsm8k", i, 1)) for i, q in enumerate(questions)]
    base = dict(pretrained=path, agents=3, agent_max_tokens=agent_tokens)
    out = {}
    for name, extra in [("hf", dict(backend="hf", dtype="float32", device="cpu", batch_size=batch)),
                        ("vllm", dict(backend="openai", base_url=url, num_concurrent=batch))]:
        lm = TextMASLM(**base, **extra)
        t0 = time.perf_counter()
        answers = lm.generate_until(reqs, disable_tqdm=True)
        out[f"{name}_s_per_q"] = (time.perf_counter() - t0) / len(reqs)
        out[f"{name}_answers"] = answers
    out["same_answers"] = out.pop("hf_answers") == out.pop("vllm_answers")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--agent-tokens", type=int, default=32)
    p.add_argument("--latent-steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    path = resolve_pretrained(args.model)
    questions = gsm8k(args.questions)
    with VLLMServer(path, ["--enable-prompt-embeds", "--dtype", "float32", "--max-model-len", "4096"]) as server:
        model, tok = load_model(path, dtype="float32", device="cpu")
        chain = AgentChain(model, tok, LatentConfig.from_dict({"agents": 4, "latent_steps": args.latent_steps}))
        backend = PromptEmbedsBackend(server.url, path, timeout=600)
        backend.preflight(model, tok)
        stage2(chain, backend, questions[:1], 1, 4)  # warm-up of both sides
        rows = [stage2(chain, backend, questions, b, args.new_tokens) for b in sorted({1, args.batch})]
        text = textmas(path, server.url, questions, args.batch, args.agent_tokens, args.new_tokens)
        started = server.ready_s
    result = {"model": args.model, "questions": args.questions, "new_tokens": args.new_tokens,
              "latent_steps": args.latent_steps, "stage2": rows, "textmas": text, "vllm_start_s": started}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"Bundled SmolLM2-135M, float32, this 2-core CPU (vLLM {server.python.parent.parent.name}, "
          f"`--enforce-eager`, ready in {started:.0f} s); {args.questions} GSM8K questions, {args.new_tokens} "
          f"answer tokens (EOS ignored), DiffMAS 4 agents x {args.latent_steps} latent steps.\n")
    print("| stage 2 (final agent) | batch | in process s/question | vLLM s/question | in process s/token "
          "| vLLM s/token | vLLM / in process |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| DiffMAS final agent | {r['batch']} | {r['hf_s_per_q']:.3f} | {r['vllm_s_per_q']:.3f} | "
              f"{r['hf_s_per_token']:.4f} | {r['vllm_s_per_token']:.4f} | "
              f"{r['vllm_s_per_q'] / r['hf_s_per_q']:.2f}x |")
    print(f"\n| text MAS (3 agents, {args.agent_tokens} tokens each upstream) | batch | backend=hf s/question | "
          "vLLM s/question | vLLM / hf | same answers |")
    print("|---|---|---|---|---|---|")
    print(f"| textmas | {args.batch} | {text['hf_s_per_q']:.3f} | {text['vllm_s_per_q']:.3f} | "
          f"{text['vllm_s_per_q'] / text['hf_s_per_q']:.2f}x | {text['same_answers']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
