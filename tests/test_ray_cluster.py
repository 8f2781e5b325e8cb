"""The scheduler on a Ray of two nodes, both on this machine and on loopback, one declared GPU each: the store check
runs on each node and names the node that cannot see the store; jobs of one GPU each land on both nodes; GPUs per
job that no single node has are refused with the numbers, before anything runs.

The head is the local Ray the leaderboard starts (``scheduler.start_local``: no address file, so no other
``ray.init`` on this machine joins it); the second node is a raylet of its own (``tests/ray_node.py``), started
where the machine allows it in a mount namespace of its own in which one directory is hidden by an empty tmpfs: a
node that cannot see what the head sees, as a node of a real cluster without the shared filesystem. One Ray for
the module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from diffmas_eval.commands.cli import main

ray = pytest.importorskip("ray")

NODE = Path(__file__).with_name("ray_node.py")


def _can_hide(directory: Path) -> bool:
    """Whether a process can get a mount namespace in which ``directory`` is an empty tmpfs (root, or a kernel
    that lets unprivileged users have one)."""
    try:
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               f'mount -t tmpfs none "{directory}"'], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    from ray._private import ray_constants

    from diffmas_eval.leaderboard.runner.scheduler import cluster, start_local

    mp = pytest.MonkeyPatch()
    mp.delenv("RAY_ADDRESS", raising=False)
    # Ray's single-machine mode: 127.0.0.1 stays 127.0.0.1 (cluster mode would swap in the machine's address)
    mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    mp.setenv("RAY_worker_niceness", "0")
    hidden = tmp_path_factory.mktemp("hidden")  # empty on the second node, where the machine allows it
    blind = _can_hide(hidden)
    start_local(num_gpus=1, num_cpus=2)
    address, head_id = ray.get_runtime_context().gcs_address, ray.get_runtime_context().get_node_id()
    cmd = [sys.executable, str(NODE), address, "1"]
    if blind:
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               f'mount -t tmpfs none "{hidden}" && exec "$@"', "sh", *cmd]
    log = tmp_path_factory.mktemp("node") / "node.log"
    node = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300  # a few seconds on an idle machine
        while len(cluster()) < 2 and time.time() < deadline and node.poll() is None:
            time.sleep(0.5)
        nodes = cluster()
        if len(nodes) < 2:
            node.kill()
            pytest.fail(f"the second node did not join: {log.read_text()[-3000:]}")
        assert {n["ip"] for n in nodes} == {"127.0.0.1"} and [n["gpus"] for n in nodes] == [1, 1]
        yield SimpleNamespace(address=address, nodes=nodes, hidden=hidden if blind else None, head_id=head_id)
    finally:
        node.terminate()  # its raylet with it
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()
        ray.shutdown()
        mp.undo()


def test_the_store_check_runs_a_task_on_each_node(two_nodes, tmp_path):
    from diffmas_eval.leaderboard.runner.scheduler import check_store

    seen = check_store(tmp_path, two_nodes.nodes)
    assert seen == {n["id"]: True for n in two_nodes.nodes}  # each answer came from the node it was sent to


def test_a_node_that_cannot_see_the_store_is_named_before_anything_runs(two_nodes, tiny_path, data_dir, capsys,
                                                                        monkeypatch):
    if two_nodes.hidden is None:
        pytest.skip("no mount namespace here (unshare needs root or unprivileged user namespaces)")
    from diffmas_eval.leaderboard.runner.scheduler import PlacementError, check_store

    other = next(n for n in two_nodes.nodes if n["id"] != two_nodes.head_id)
    store = two_nodes.hidden / "store"
    store.mkdir()
    with pytest.raises(PlacementError) as refused:
        check_store(store, two_nodes.nodes)
    assert str(refused.value).startswith(f"{store}: not visible from node(s) {other['name']};")
    assert two_nodes.head_id[:8] not in str(refused.value) and other["id"][:8] in other["name"]
    # the same through the leaderboard: refused at start-up, nothing scored
    out = two_nodes.hidden / "run"
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(data_dir))
    assert main(["leaderboard", "--model", str(tiny_path), "--methods", "single", "--tasks", "diffmas_arc_challenge",
                 "--limit", "2", "--ray-address", two_nodes.address, "--output", str(out / "leaderboard.csv")]) == 2
    assert f"{out}: not visible from node(s) {other['name']};" in capsys.readouterr().err
    assert not (out / "runs").exists()


def placement_token_and_runtime_env() -> tuple[dict, str | None, dict]:
    """Run as a job: where it ran, the hub token this process sees, and the runtime_env Ray recorded for its task."""
    from diffmas_eval.leaderboard.runner.scheduler import placement

    return placement(), os.environ.get("HF_TOKEN"), ray.get_runtime_context().runtime_env


def test_one_gpu_jobs_land_on_both_nodes_with_the_hub_token_out_of_their_runtime_env(two_nodes, tmp_path,
                                                                                      monkeypatch):
    """Ray shows a task's runtime_env (dashboard, ``ray list tasks --detail``, job metadata): the token travels as
    the task's argument instead, and each job still has it."""
    from diffmas_eval.leaderboard.runner.scheduler import Job, Resources, run_jobs

    monkeypatch.setenv("HF_TOKEN", "hf_not_in_metadata")
    jobs = [Job(f"job {k}", placement_token_and_runtime_env, (), tmp_path / f"job-{k}.log") for k in range(2)]
    done = run_jobs(jobs, Resources(address=two_nodes.address, gpus_per_cell=1, store=tmp_path))
    where = {j.name: done[j.name][0] for j in jobs}
    assert {where[j.name]["node_id"] for j in jobs} == {n["id"] for n in two_nodes.nodes}  # one GPU per node
    assert all(where[j.name]["gpu_ids"] == ["0"] for j in jobs)  # each node's own GPU 0
    for job in jobs:
        _, token, runtime_env = done[job.name]
        assert token == "hf_not_in_metadata"
        assert "hf_not_in_metadata" not in json.dumps(runtime_env) and runtime_env["env_vars"]  # the rest travels


@pytest.mark.parametrize("flag", ["--gpus-per-cell", "--gpus-per-training"])
def test_two_gpus_per_job_on_nodes_of_one_are_refused_with_the_numbers(two_nodes, tiny_path, data_dir, tmp_path,
                                                                       capsys, monkeypatch, flag):
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(data_dir))
    t0 = time.perf_counter()
    assert main(["leaderboard", "--model", str(tiny_path), "--methods", "single", "--tasks", "diffmas_arc_challenge",
                 "--limit", "2", "--ray-address", two_nodes.address, flag, "2",
                 "--output", str(tmp_path / "leaderboard.csv")]) == 2
    per_node = ", ".join(f"{n['name']}: 1" for n in two_nodes.nodes)
    assert (f"{flag} 2: no node has that many GPUs (the most on one node: 1; GPUs per node: {per_node})"
            in capsys.readouterr().err)
    assert not (tmp_path / "runs").exists() and time.perf_counter() - t0 < 60

