"""`lm_eval --model textmas`: lm-eval's `hf` is the oracle for agents=1; a real `transformers serve` is the
oracle-equal twin of backend=hf; a dead, hanging or garbage server fails fast with its URL."""

import copy
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance

from diffmas_eval.harness.common import ACCOUNTING_KEY, add_accounting
from diffmas_eval.harness.textmas_lm import TextMASLM
from diffmas_eval.leaderboard import method_model_args, rows_from_results
from diffmas_eval.prompts import topology_roles
from diffmas_eval.testing.tiny import make_tokenizer
from diffmas_eval.textmas import BackendError, Completion, TextChain

GEN = {"max_gen_toks": 10}


def evaluate(model, model_args, tasks, limit=2, **kw):
    return simple_evaluate(model=model, model_args=model_args, tasks=tasks, limit=limit, log_samples=True,
                           gen_kwargs=GEN, device="cpu", **kw)


def samples(results, task, accounting=True):
    """The logged samples; with the accounting records of the latest run (as the sample log file gets them)."""
    logged = copy.deepcopy(sorted(results["samples"][task], key=lambda s: s["doc_id"]))
    return add_accounting(task, logged) if accounting else logged


# -- agents=1 is lm-eval's hf -------------------------------------------------------------------------
@pytest.mark.parametrize("chat", [False, True])
def test_single_agent_equals_hf(tiny_path, local_data, chat):
    tasks = ["diffmas_gsm8k", "diffmas_arc_challenge"] if not chat else ["diffmas_commonsense_qa_gen"]
    hf = evaluate("hf", f"pretrained={tiny_path},dtype=float32", tasks, apply_chat_template=chat)
    tm = evaluate("textmas", f"pretrained={tiny_path},agents=1,dtype=float32", tasks, apply_chat_template=chat,
                  batch_size=2)
    for task in tasks:
        for h, t in zip(samples(hf, task, accounting=False), samples(tm, task), strict=True):
            assert h["arguments"] == t["arguments"]
            if isinstance(h["resps"][0][0], (list, tuple)):  # log-likelihoods
                for (lh, gh), (lt, gt) in zip([r[0] for r in h["resps"]], [r[0] for r in t["resps"]]):
                    assert abs(lh - lt) < 1e-4 and gh == gt
            else:
                assert h["resps"] == t["resps"] and h["resps"][0][0] != ""
                record = t[ACCOUNTING_KEY]
                assert [a["role"] for a in record["agents"]] == ["solver"] and 0 < record["tokens"] <= 10
            assert t[ACCOUNTING_KEY]["seconds"] > 0
        assert hf["results"][task] == tm["results"][task]
    summary = tm["config"]["accounting"]
    assert summary["method"] == "textmas" and set(summary["per_task"]) == set(tasks)


# -- the chain: who reads what ------------------------------------------------------------------------
class Recorder:
    """A backend that answers 'note from <role>' and keeps every prompt, batch by batch."""

    def __init__(self):
        self.batches = []

    def generate(self, prompts, max_tokens, stop=None):
        self.batches.append(prompts)
        return [Completion(f"note {len(self.batches)}.{i}", 3) for i in range(len(prompts))]


def test_sequential_agents_read_earlier_texts_hierarchical_agents_only_the_question():
    tok = make_tokenizer()
    seq = Recorder()
    traces = TextChain(seq, tok, topology_roles(4, "sequential"), agent_max_tokens=5).run(["Q1?", "Q2?"])
    assert [len(b) for b in seq.batches] == [2, 2, 2]  # one batch per agent, questions side by side
    assert "note 1.0" in seq.batches[1][0] and "note 1.1" in seq.batches[1][1]  # the critic reads the planner
    assert "note 1.0" in seq.batches[2][0] and "note 2.0" in seq.batches[2][0]  # the refiner reads both
    assert [a.role for a in traces[0].agents] == ["planner", "critic", "refiner"]
    note = traces[1].preamble()
    assert all(f"note {k}.1" in note for k in (1, 2, 3)) and "[critic]" in note

    hier = Recorder()
    roles = topology_roles(4, "hierarchical")
    assert roles == ["math", "science", "code", "summarizer"]
    traces = TextChain(hier, tok, roles, topology="hierarchical", agent_max_tokens=5).run(["Q1?", "Q2?"])
    assert len(hier.batches) == 1 and len(hier.batches[0]) == 6  # all domain agents at once
    assert not any("note" in p or "Earlier agents" in p for p in hier.batches[0])
    assert [(a.role, a.text) for a in traces[1].agents] == [("math", "note 1.1"), ("science", "note 1.3"),
                                                            ("code", "note 1.5")]


def test_text_trace_reaches_the_final_agent_in_its_chat_turn(tiny_path):
    lm = TextMASLM.create_from_arg_string(f"pretrained={tiny_path},agents=3,agent_max_tokens=4")
    text = lm.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert lm.question(text) == "What is 2+2?"
    trace = lm.chain.run(["What is 2+2?"])[0]
    final = lm.final_context(text, trace)
    assert final.endswith("What is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert final.count("<|im_start|>user") == 1 and "[planner]" in final and "[critic]" in final
    assert lm.final_context("Question: x\nAnswer:", trace).endswith("[End of notes.]\n\nQuestion: x\nAnswer:")


# -- a real OpenAI-compatible server ------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_path):
    """`transformers serve` on 127.0.0.1 with the tiny model; always stopped."""
    port = _free_port()
    cmd = [str(Path(sys.executable).with_name("transformers")), "serve", str(tiny_path), "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu", "--dtype", "float32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("transformers serve was not ready within 120 s")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("topology,chat", [("sequential", True), ("hierarchical", False)])
def test_openai_backend_on_a_real_server_equals_hf_backend(tiny_path, local_data, server, topology, chat):
    args = f"pretrained={tiny_path},agents=3,agent_max_tokens=8,topology={topology},dtype=float32"
    task = "diffmas_gsm8k"
    local = evaluate("textmas", args, [task], apply_chat_template=chat)
    local_samples = samples(local, task)  # right after the run: the records of its model
    remote = evaluate("textmas", f"{args},backend=openai,base_url={server},num_concurrent=3,timeout=60", [task],
                      apply_chat_template=chat)
    for h, o in zip(local_samples, samples(remote, task), strict=True):
        assert h["resps"] == o["resps"] and h["resps"][0][0] != ""
        hr, orr = h[ACCOUNTING_KEY], o[ACCOUNTING_KEY]
        assert orr["backend"] == "openai" and hr["backend"] == "hf"
        # every agent's text (and token count: the server's usage vs our own count) is the same
        assert [(a["role"], a.get("text"), a["tokens"]) for a in hr["agents"]] == \
               [(a["role"], a.get("text"), a["tokens"]) for a in orr["agents"]]
        assert [a["role"] for a in orr["agents"]][:2] == topology_roles(3, topology)[:2]
        assert all(a["tokens"] == 8 for a in orr["agents"][:2])  # random weights: never an early EOS
        # transformers serve accepts logprobs=0 and ignores it: no stability record, rather than a made-up one
        assert hr["stability"] and "stability" not in orr
    assert local["results"][task] == remote["results"][task]


def test_loglikelihood_on_a_server_without_prompt_logprobs_fails_clearly(tiny_path, local_data, server):
    with pytest.raises(BackendError, match=rf"(?s){server}.*echo=True with logprobs"):
        evaluate("textmas", f"pretrained={tiny_path},agents=2,agent_max_tokens=2,backend=openai,base_url={server}",
                 ["diffmas_arc_challenge"], limit=1)


# -- broken servers: a clear error, in bounded time ---------------------------------------------------
def _request():
    return Instance(request_type="generate_until", doc={}, arguments=("Q: 1+1?\nA:", {"until": ["\n"]}), idx=0,
                    metadata=("t", 0, 1))


def _openai_lm(tiny_path, url, **kw):
    extra = "".join(f",{k}={v}" for k, v in kw.items())
    return TextMASLM.create_from_arg_string(f"pretrained={tiny_path},agents=2,backend=openai,base_url={url}{extra}")


class _Garbage(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b"<html>502 bad gateway, or anything that is not a completion</html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_server_down_hanging_or_garbage_fails_within_the_timeout(tiny_path):
    down = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(BackendError, match=rf"cannot reach .*{down}.*Is the server running"):
        _openai_lm(tiny_path, down, timeout=2, max_retries=2).generate_until([_request()])
    assert time.monotonic() - t0 < 20

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        t0 = time.monotonic()
        with pytest.raises(BackendError, match=rf"{url}.*did not answer within timeout=1.0s \(after 1 retries\)"):
            _openai_lm(tiny_path, url, timeout=1, max_retries=1).generate_until([_request()])
        assert time.monotonic() - t0 < 15  # 2 attempts of 1 s, plus backoff

    garbage = HTTPServer(("127.0.0.1", 0), _Garbage)
    threading.Thread(target=garbage.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{garbage.server_port}/v1"
        with pytest.raises(BackendError, match=rf"{url}.*not a completion"):
            _openai_lm(tiny_path, url, timeout=2, max_retries=0).generate_until([_request()])
    finally:
        garbage.shutdown()


def test_bad_model_args_list_the_valid_ones(tiny_path):
    with pytest.raises(ValueError, match=r"(?s)unknown textmas model_args \['agent_max_token'\]; valid ones:\n"
                                         r".*base_url.*agent_max_tokens"):
        TextMASLM.create_from_arg_string(f"pretrained={tiny_path},agent_max_token=3")
    with pytest.raises(ValueError, match="backend=openai needs base_url="):
        TextMASLM.create_from_arg_string(f"pretrained={tiny_path},backend=openai")
    with pytest.raises(ValueError, match="topology='star' is not valid"):
        TextMASLM.create_from_arg_string(f"pretrained={tiny_path},topology=star")


# -- accounting in the sample log and the results -----------------------------------------------------
def test_cli_sample_log_keeps_every_agent_text_and_the_results_summarise(tiny_path, local_data, tmp_path):
    out = subprocess.run(
        [str(Path(sys.executable).with_name("lm_eval")), "--model", "textmas",
         "--model_args", f"pretrained={tiny_path},agents=3,agent_max_tokens=5", "--tasks", "diffmas_gsm8k",
         "--limit", "2", "--gen_kwargs", "max_gen_toks=6", "--device", "cpu", "--output_path", str(tmp_path),
         "--log_samples"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (sample_file,) = tmp_path.rglob("samples_diffmas_gsm8k_*.jsonl")
    logged = [json.loads(line) for line in sample_file.read_text().splitlines()]
    assert len(logged) == 2
    for sample in logged:
        record = sample[ACCOUNTING_KEY]
        assert record["doc_id"] == sample["doc_id"] and record["seconds"] > 0
        planner, critic, solver = record["agents"]
        assert (planner["role"], critic["role"], solver["role"]) == ("planner", "critic", "solver")
        assert planner["text"] and critic["text"] and planner["tokens"] == critic["tokens"] == 5
        assert 0 < solver["tokens"] <= 6 and record["tokens"] == 10 + solver["tokens"]
    (results_file,) = tmp_path.rglob("results_*.json")
    summary = json.loads(results_file.read_text())["config"]["accounting"]
    assert summary["samples"] == 2 and summary["tokens_per_agent"]["planner"] == 5
    assert summary["per_task"]["diffmas_gsm8k"]["seconds_per_sample"] > 0


def test_accounting_is_the_given_models_and_never_written_onto_lm_evals_requests(tiny_path, local_data):
    """A caller holding the model objects gets each one's records (``add_accounting(..., lm.accounting)``), not
    the latest model's; lm-eval's Instances carry no attribute of ours."""
    from diffmas_eval.harness.diffmas_lm import DiffMASLM

    two, three = (DiffMASLM.create_from_arg_string(f"pretrained={tiny_path},device=cpu,agents={n},latent_steps=1")
                  for n in (2, 3))
    runs = [simple_evaluate(model=lm, tasks=["diffmas_gsm8k"], limit=2, log_samples=True, gen_kwargs=GEN)
            for lm in (two, three)]
    first = add_accounting("diffmas_gsm8k", copy.deepcopy(runs[0]["samples"]["diffmas_gsm8k"]), two.accounting)
    latest = add_accounting("diffmas_gsm8k", copy.deepcopy(runs[0]["samples"]["diffmas_gsm8k"]))
    assert [len(s[ACCOUNTING_KEY]["agents"]) for s in first] == [2, 2]
    assert [len(s[ACCOUNTING_KEY]["agents"]) for s in latest] == [3, 3]  # the CLI's only handle: the latest model
    assert len(two.accounting.records) == len(three.accounting.records) == 2
    assert two.accounting._seen == {}  # nothing of the finished run is held


def test_a_request_is_accounted_once_per_repeat_and_left_as_lm_eval_made_it():
    from diffmas_eval.harness.common import Accounting

    acc = Accounting("diffmas")
    req = Instance("generate_until", {}, ("Q: 1+1?", {}), 0, metadata=("t", 0, 2))  # task, doc_id, repeats
    before = dict(vars(req))
    for _ in range(3):  # the third is a data-parallel padding copy: not counted again
        acc.record(req, [{"role": "solver", "tokens": 1}], 0.1)
    assert len(acc.records) == 2 and vars(req) == before
    del req
    assert acc._seen == {}  # the entry left with its request


def test_diffmas_accounting_and_leaderboard_columns(tiny_path, local_data):
    res = evaluate("diffmas", f"pretrained={tiny_path},agents=2,latent_steps=3", ["diffmas_gsm8k"], limit=2,
                   batch_size=2)
    for sample in samples(res, "diffmas_gsm8k"):
        planner, solver = sample[ACCOUNTING_KEY]["agents"]
        assert planner == {"role": "planner", "tokens": 0, "latent_steps": 3}
        assert 0 < solver["tokens"] <= GEN["max_gen_toks"] and sample[ACCOUNTING_KEY]["seconds"] > 0
    (row,) = [r for r in rows_from_results(res, "diffmas") if r["metric"] == "exact_match"][:1]
    assert row["tokens_per_sample"] == res["config"]["accounting"]["per_task"]["diffmas_gsm8k"]["tokens_per_sample"]
    assert method_model_args("textmas", "m", 3, 10, 64, "backend=openai,base_url=http://h/v1") == (
        "textmas", "pretrained=m,agents=3,agent_max_tokens=64,backend=openai,base_url=http://h/v1")
