"""stage2=vllm: the trace exported as prompt embeddings is the chain's final agent exactly, the request is
vLLM's documented prompt-embeds encoding, and a server that decodes it as vLLM does answers as stage 2 in
process. No vLLM here (no GPU): the server is a real socket server written below that decodes the body as
vLLM's OpenAI server does (base64 -> torch.load) and runs the same tiny model on it greedily."""

import base64
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from transformers import AutoModelForCausalLM, AutoTokenizer

from diffmas_eval.harness.diffmas_lm import DiffMASLM
from diffmas_eval.latent import AgentChain, LatentConfig
from diffmas_eval.prompts import default_roles
from diffmas_eval.stage2_vllm import PromptEmbedsBackend, Sampling, encode_prompt_embeds, trace_embeddings
from diffmas_eval.textmas import BackendError
from diffmas_eval.tiny import make_tiny_model

from .conftest import QUESTIONS


def vllm_load(data: str) -> torch.Tensor:
    """vLLM's server (entrypoints, ``load_prompt_embeds``): base64 -> torch.load(weights_only) on CPU."""
    tensor = torch.load(io.BytesIO(base64.b64decode(data, validate=True)), weights_only=True,
                        map_location=torch.device("cpu"))
    assert isinstance(tensor, torch.Tensor) and tensor.dtype in (torch.float32, torch.bfloat16, torch.float16)
    tensor = tensor.to_dense()
    return tensor.squeeze(0) if tensor.dim() > 2 else tensor


def _chain(arch: str, latent_steps: int = 3, agents: int = 3):
    model, tok = make_tiny_model(arch)
    return AgentChain(model, tok, LatentConfig(roles=default_roles(agents), latent_steps=latent_steps))


# -- the export ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_exported_embeddings_are_the_final_agent_over_the_trace(arch):
    """Rows of different lengths, batched; gemma3 scales its embeddings and mixes sliding-window layers."""
    chain = _chain(arch)
    questions = QUESTIONS
    with torch.no_grad():
        trace = chain.stage1(questions, record_inputs=True)
        finals = [chain.final_prompt(q) for q in questions]
        logits, ends = chain.final_logits(trace, finals)
        rows = trace_embeddings(chain.model, trace, finals)
        lengths = {len(r) for r in rows}
        assert len(lengths) == len(questions)  # really different lengths
        for i, (emb, final) in enumerate(zip(rows, finals)):
            n = emb.shape[0]
            assert n == int(trace.next_pos[i]) + len(final) and emb.shape[1] == chain.model.config.hidden_size
            out = chain.model(inputs_embeds=emb[None], position_ids=torch.arange(n)[None], use_cache=False)
            ours = out.logits[0, n - len(final):]
            theirs = logits[i, int(ends[i]) - len(final):int(ends[i])]
            assert (ours - theirs).abs().max().item() < 1e-4


def test_overwrite_trace_or_missing_inputs_are_refused():
    chain = _chain("llama")
    with torch.no_grad():
        plain = chain.stage1(QUESTIONS[:1])
        with pytest.raises(ValueError, match="record_inputs=True"):
            trace_embeddings(chain.model, plain, [[1, 2]])
        chain.config.trace = "overwrite"
        over = chain.stage1(QUESTIONS[:1], record_inputs=True)
    with pytest.raises(ValueError, match="not one causal sequence.*trace=concat"):
        trace_embeddings(chain.model, over, [[1, 2]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_request_body_round_trips_through_vllms_decoding(dtype):
    chain = _chain("llama")
    with torch.no_grad():
        trace = chain.stage1(QUESTIONS[:2], record_inputs=True)
        rows = trace_embeddings(chain.model, trace, [chain.final_prompt(q) for q in QUESTIONS[:2]])
    for emb in rows:
        emb = emb.to(dtype)
        back = vllm_load(json.loads(json.dumps({"prompt_embeds": encode_prompt_embeds(emb)}))["prompt_embeds"])
        assert back.dtype == dtype and back.shape == emb.shape and torch.equal(back, emb)
    view = rows[0][:3]  # a view: only its own rows are sent, not the whole storage
    assert len(encode_prompt_embeds(view)) < len(encode_prompt_embeds(rows[0])) / 2
    with pytest.raises(ValueError, match=r"\[tokens, hidden\]"):
        encode_prompt_embeds(rows[0][None])


# -- a server that decodes prompt embeds as vLLM does ------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbedsServer:
    """``/v1/completions`` with ``prompt_embeds``: decoded as vLLM decodes them, scaled as vLLM's Gemma/Gemma 2
    scale ``inputs_embeds``, then greedy (``model.generate`` from ``inputs_embeds``), stop strings cut."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.bodies = model, tokenizer, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies.append(body)
                reply = json.dumps(server.complete(body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.http = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}/v1"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    @torch.no_grad()
    def complete(self, body: dict) -> dict:
        assert body["prompt"] == "" and body["temperature"] == 0.0
        emb = vllm_load(body["prompt_embeds"]).to(self.model.dtype)
        config = self.model.config
        if config.model_type in ("gemma", "gemma2"):  # vLLM's Gemma(2)Model.forward: inputs_embeds *= normalizer
            emb = emb * torch.tensor(config.hidden_size ** 0.5, dtype=emb.dtype)
        eos = self.tokenizer.eos_token_id
        out = self.model.generate(inputs_embeds=emb[None], attention_mask=torch.ones(1, len(emb), dtype=torch.long),
                                  max_new_tokens=body["max_tokens"], do_sample=False, eos_token_id=eos,
                                  pad_token_id=self.tokenizer.pad_token_id)
        ids = [t for t in out[0].tolist() if t != eos]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for s in body.get("stop") or []:
            text = text.split(s)[0]
        return {"id": "cmpl-test", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": len(emb), "completion_tokens": len(ids),
                          "total_tokens": len(emb) + len(ids)}}

    def close(self):
        self.http.shutdown()
        self.http.server_close()


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_backend_answers_as_the_chain_in_process(arch):
    """gemma2: vLLM multiplies its prompt embeddings by sqrt(hidden); the request compensates."""
    chain = _chain(arch, latent_steps=2)
    server = EmbedsServer(chain.model, chain.tokenizer)
    try:
        with torch.no_grad():
            trace = chain.stage1(QUESTIONS, record_inputs=True)
            finals = [chain.final_prompt(q) for q in QUESTIONS]
            local = chain.generate(trace, finals, max_new_tokens=8, stop=["\n\n"])
            backend = PromptEmbedsBackend(server.url, "tiny-lora", timeout=30, max_retries=0, num_concurrent=2)
            backend.embed_scale = chain.model.config.hidden_size ** 0.5 if arch == "gemma2" else 1.0
            rows = trace_embeddings(chain.model, trace, finals)
            remote = backend.generate_embeds(rows, 8, ["\n\n"], Sampling())
        assert [g.text for g in local] == [c.text for c in remote] and any(g.text for g in local)
        assert [c.tokens for c in remote] == [len(g.token_ids) for g in local]
        body = server.bodies[0]
        assert body["model"] == "tiny-lora" and body["max_tokens"] == 8 and body["stop"] == ["\n\n"]
        sent = {tuple(vllm_load(b["prompt_embeds"]).shape) for b in server.bodies}
        assert sent == {tuple(r.shape) for r in rows}
    finally:
        server.close()


# -- through lm-eval ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embeds_server(tiny_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    server = EmbedsServer(model, AutoTokenizer.from_pretrained(tiny_path))
    yield server
    server.close()


def _evaluate(args, tasks, **kw):
    return simple_evaluate(model="diffmas", model_args=args, tasks=tasks, limit=2, log_samples=True,
                           gen_kwargs={"max_gen_toks": 10}, device="cpu", batch_size=2, **kw)


def test_lm_eval_stage2_vllm_gives_the_in_process_answers(tiny_path, local_data, embeds_server):
    args = f"pretrained={tiny_path},agents=3,latent_steps=2,dtype=float32"
    task = "diffmas_gsm8k"
    local = _evaluate(args, [task])
    remote = _evaluate(f"{args},stage2=vllm,base_url={embeds_server.url},num_concurrent=2", [task])
    by_doc = [sorted(r["samples"][task], key=lambda s: s["doc_id"]) for r in (local, remote)]
    assert [s["resps"] for s in by_doc[0]] == [s["resps"] for s in by_doc[1]]
    assert any(s["resps"][0][0] for s in by_doc[0])
    assert len(embeds_server.bodies) >= 2 and embeds_server.bodies[-1]["model"] == str(tiny_path)
    assert local["results"][task] == remote["results"][task]


def test_loglikelihood_and_overwrite_and_bad_options_are_refused_clearly(tiny_path, local_data):
    base = f"pretrained={tiny_path},agents=2,latent_steps=1,stage2=vllm,base_url=http://127.0.0.1:9/v1"
    with pytest.raises(NotImplementedError, match="loglikelihood with stage2=vllm.*stage2=hf"):
        _evaluate(base, ["diffmas_arc_challenge"])
    with pytest.raises(ValueError, match="stage2=vllm needs trace=concat.*overwrite"):
        DiffMASLM.create_from_arg_string(f"{base},trace=overwrite")
    with pytest.raises(ValueError, match="stage2=vllm needs base_url="):
        DiffMASLM.create_from_arg_string(f"pretrained={tiny_path},stage2=vllm")
    with pytest.raises(ValueError, match="stage2='sglang' is not valid"):
        DiffMASLM.create_from_arg_string(f"pretrained={tiny_path},stage2=sglang")


def test_dead_server_fails_with_its_url_after_bounded_retries(tiny_path):
    down = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
    lm = DiffMASLM.create_from_arg_string(
        f"pretrained={tiny_path},agents=2,latent_steps=1,stage2=vllm,base_url={down},timeout=2,max_retries=1")
    request = Instance(request_type="generate_until", doc={}, arguments=("Q: 1+1?\nA:", {"until": ["\n"]}), idx=0,
                       metadata=("t", 0, 1))
    t0 = time.monotonic()
    with pytest.raises(BackendError, match=rf"(?s)cannot reach .*{down}.*1 retries.*--enable-prompt-embeds"):
        lm.generate_until([request])
    assert time.monotonic() - t0 < 20
