"""The leaderboard joining a running Ray the way docs/leaderboard.md shows it: ``ray start --head`` on this machine
(bound to loopback, two declared GPUs), then ``RAY_ADDRESS=... diffmas-eval leaderboard`` in another process.

Ray 2.60 turns token authentication on in ``ray start --head`` wherever a token exists (``~/.ray/auth_token``, which
any local Ray writes), while a driver joining by address keeps it off unless ``RAY_AUTH_MODE=token``: the driver
here has no ``RAY_AUTH_MODE`` (the token is given by ``RAY_AUTH_TOKEN_PATH``, so the test touches no file of the
user's), and the run must join, place its cell on a declared GPU and score it.

The head runs with ``--block`` in a process of this test, whose end stops the head's processes: never ``ray stop``,
which stops every Ray on the machine."""

from __future__ import annotations

import csv
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ray = pytest.importorskip("ray")


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _env(token: Path) -> dict[str, str]:
    """This environment less any authentication mode (a start_local in this process sets RAY_AUTH_MODE=token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    return {**env, "RAY_AUTH_TOKEN_PATH": str(token), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_worker_niceness": "0"}


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """``ray start --head`` on 127.0.0.1 with a token present: authentication on, as on any node where Ray ran."""
    root = tmp_path_factory.mktemp("head")
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    gcs, client, agent, grpc, metrics, env_agent = _free_ports(6)
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address",
           "127.0.0.1", "--port", str(gcs), "--num-gpus", "2", "--num-cpus", "2", "--include-dashboard", "false",
           "--disable-usage-stats", "--ray-client-server-port", str(client), "--dashboard-agent-listen-port",
           str(agent), "--dashboard-agent-grpc-port", str(grpc), "--metrics-export-port", str(metrics),
           "--runtime-env-agent-port", str(env_agent)]
    log = root / "head.log"
    proc = subprocess.Popen(cmd, env=_env(token), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"127.0.0.1:{gcs}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and "Ray runtime started" not in log.read_text():
            time.sleep(0.5)
        if "Ray runtime started" not in log.read_text():
            pytest.fail(f"ray start --head did not start: {log.read_text()[-3000:]}")
        yield address, token
    finally:
        family = []
        if proc.poll() is None:
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(family, timeout=60)
        for p in alive:  # what the head's own shutdown left: only this head's processes, by pid
            p.kill()


def test_a_bare_driver_is_refused_by_the_head(head):
    """The premise: ``ray.init(address=...)`` without RAY_AUTH_MODE sends no token and is refused."""
    address, token = head
    code = f"import ray; ray.init(address={address!r}, _node_ip_address='127.0.0.1')"
    out = subprocess.run([sys.executable, "-c", code], env=_env(token), capture_output=True, text=True, timeout=180)
    assert out.returncode != 0 and "InvalidAuthToken" in out.stdout + out.stderr, (out.stdout + out.stderr)[-2000:]


def test_the_leaderboard_joins_a_head_on_loopback_through_ray_address(head, tiny_path, data_dir, tmp_path):
    address, token = head
    out = tmp_path / "joined"
    cmd = [sys.executable, "-m", "diffmas_eval.commands.cli", "leaderboard", "--model", str(tiny_path), "--methods",
           "single", "--tasks", "diffmas_arc_challenge", "--limit", "2", "--agents", "2",
           "--latent-steps", "2", "--max-gen-toks", "8", "--batch-size", "2", "--threads", "1",
           "--output", str(out / "leaderboard.csv")]
    env = {**_env(token), "RAY_ADDRESS": address, "DIFFMAS_DATA_DIR": str(data_dir)}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    meta = {p.parent.name: json.loads(p.read_text())["leaderboard"]["placement"]
            for p in (out / "runs").glob("*/results_*.json")}
    assert set(meta) == {"single"} and meta["single"]["gpu_ids"] in (["0"], ["1"])  # one of the head's 2 GPUs
    assert meta["single"]["pid"] > 0
    with open(out / "leaderboard.csv", newline="") as f:
        assert {r["method"] for r in csv.DictReader(f)} == {"single"}
