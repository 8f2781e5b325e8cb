"""stage2=vllm: the trace exported as prompt embeddings is the chain's final agent exactly, the request is
vLLM's documented prompt-embeds encoding, and a server that decodes it as vLLM does answers as stage 2 in
process (against a real vLLM: test_vllm.py)."""

import base64
import io
import json
import socket
import time

import pytest
import torch

from diffmas_eval.harness.diffmas_lm import DiffMASLM
from diffmas_eval.latent import AgentChain, LatentConfig
from diffmas_eval.prompts import default_roles
from diffmas_eval.serving.stage2_vllm import encode_prompt_embeds, trace_embeddings
from diffmas_eval.testing.tiny import make_tiny_model
from diffmas_eval.textmas import BackendError

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
    chain.config.trace = "stitch"
    with torch.no_grad():
        stitched = chain.stage1(QUESTIONS[:1], record_inputs=True)
    with pytest.raises(ValueError, match="stitched or hierarchical trace .* not one causal sequence"):
        trace_embeddings(chain.model, stitched, [[1, 2]])


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


# -- refusals before any compute (the real server's tests are in test_vllm.py) ------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_overwrite_and_bad_options_are_refused_before_loading(tiny_path):
    base = f"pretrained={tiny_path},agents=2,latent_steps=1,stage2=vllm,base_url=http://127.0.0.1:9/v1"
    with pytest.raises(ValueError, match="stage2=vllm needs trace=concat.*overwrite"):
        DiffMASLM.create_from_arg_string(f"{base},trace=overwrite")
    with pytest.raises(ValueError, match="stage2=vllm needs base_url="):
        DiffMASLM.create_from_arg_string(f"pretrained={tiny_path},stage2=vllm")
    with pytest.raises(ValueError, match="stage2='sglang' is not valid"):
        DiffMASLM.create_from_arg_string(f"pretrained={tiny_path},stage2=sglang")


def test_dead_server_fails_with_its_url_after_bounded_retries_before_any_answer(tiny_path):
    down = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(BackendError, match=rf"(?s)cannot reach .*{down}.*1 retries"):
        DiffMASLM.create_from_arg_string(
            f"pretrained={tiny_path},agents=2,latent_steps=1,stage2=vllm,base_url={down},timeout=2,max_retries=1")
    assert time.monotonic() - t0 < 20
