"""The leaderboard's jobs on Ray (``leaderboard/scheduler.py``), on this CPU with two declared GPUs.

One Ray for the module, bound to loopback: ``ray.init(num_gpus=2)`` declares GPUs on a machine without any, so
placement (Ray's GPU ids, its ``CUDA_VISIBLE_DEVICES``) is real while the jobs compute on the CPU."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from diffmas_eval.commands.cli import main

ray = pytest.importorskip("ray")

# a miniature leaderboard: two untrained cells that can run side by side, and one trained cell after its adapter
ARGS = ["--methods", "single,latentmas,diffmas", "--tasks", "diffmas_arc_challenge", "--limit", "2", "--agents", "2",
        "--latent-steps", "2", "--max-gen-toks", "8", "--train-steps", "2", "--train-batch-size", "1",
        "--train-max-length", "2048", "--sft-examples", "commonsense=4", "--batch-size", "2", "--threads", "1"]


def leaderboard(model: Path, out: Path, *extra: str) -> int:
    return main(["leaderboard", "--model", str(model), *ARGS, "--output", str(out / "leaderboard.csv"), *extra])


@pytest.fixture(scope="module")
def cluster(data_dir):
    """Ray with 2 declared GPUs and 3 CPUs: the training (no GPU asked) and both untrained cells at once."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFMAS_DATA_DIR", str(data_dir))
    mp.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", ""))
    mp.delenv("RAY_ADDRESS", raising=False)
    from diffmas_eval.leaderboard.runner.scheduler import start_local
    from diffmas_eval.leaderboard.runner.serve import SERVER_RESOURCE, SERVER_SLOTS

    start_local(num_gpus=2, num_cpus=3, resources={SERVER_RESOURCE: SERVER_SLOTS})  # as a served run declares it
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    yield
    ray.shutdown()
    mp.undo()


@pytest.fixture(scope="module")
def on_ray(cluster, tiny_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray")
    assert leaderboard(tiny_path, out, "--jobs", "3", "--gpus-per-training", "0") == 0
    return out


@pytest.fixture(scope="module")
def in_order(on_ray, tiny_path, tmp_path_factory):
    """The same leaderboard one job at a time in this process, as it ran before Ray (Ray is left running: the
    sequential path is chosen by --jobs 1 with no GPU asked, so it is forced here by leaving Ray out)."""
    import diffmas_eval.leaderboard.run as run_module

    out = tmp_path_factory.mktemp("sequential")
    mp = pytest.MonkeyPatch()
    mp.setattr(run_module, "wants_ray", lambda res: False)
    try:
        assert leaderboard(tiny_path, out, "--jobs", "1") == 0
    finally:
        mp.undo()
    return out


def rows(out: Path) -> dict:
    with open(out / "leaderboard.csv", newline="") as f:
        return {(r["method"], r["task"], r["metric"]): (r["value"], r["stderr"], r["n"]) for r in csv.DictReader(f)}


def cell_meta(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text())["leaderboard"] for p in (out / "runs").glob("*/results_*.json")}


def test_cells_run_side_by_side_on_distinct_gpus(on_ray):
    meta = cell_meta(on_ray)
    assert set(meta) == {"single", "latentmas", "diffmas"}
    for m in meta.values():
        assert m["placement"]["node"] and m["placement"]["device"] == "cpu" and len(m["placement"]["gpu_ids"]) == 1
    a, b = meta["single"], meta["latentmas"]
    assert a["started"] < b["ended"] and b["started"] < a["ended"]  # they overlapped
    assert a["placement"]["gpu_ids"] != b["placement"]["gpu_ids"]
    assert "placement" not in json.dumps(a["config"])  # never part of the hash
    with open(on_ray / "leaderboard.csv", newline="") as f:
        assert {r["device"] for r in csv.DictReader(f)} == {"cpu"}


def test_no_two_jobs_share_a_worker_process(on_ray):
    """The leaderboard's cells and training record their worker's pid: each ran in a process of its own."""
    adapter = next((on_ray / "cache" / "adapters").glob("diffmas-*"))
    recorded = [m["placement"]["pid"] for m in cell_meta(on_ray).values()]
    recorded.append(json.loads((adapter / "diffmas.json").read_text())["training"]["placement"]["pid"])
    assert len(set(recorded)) == 4, recorded


def made(path: str) -> str:
    """A job: make ``path`` (a training's adapter, in miniature)."""
    Path(path).write_text("adapter")
    return path


def flaky(registered: str, marker: str, adapter: str | None = None) -> bool:
    """A cell after ``made``: fails the first time (its server died), then says whether the driver's step on the
    adapter (``Job.then``, the registration) came before it started."""
    if not Path(marker).exists():
        Path(marker).write_text("failed once")
        raise RuntimeError("the server died")
    return Path(registered).exists()


def driver_steps(tmp_path: Path, name: str) -> tuple[list, list, Path]:
    """A training whose result the driver registers (``Job.then``) and a cell after it that fails once (its server
    died) and is rerun when the driver says so (``Resources.retry``); returns the jobs, what retry was asked, and
    the adapter."""
    from diffmas_eval.leaderboard.runner.scheduler import Job

    adapter, registered = tmp_path / f"{name}-adapter", tmp_path / f"{name}-registered"
    return [Job("train", made, (str(adapter),), tmp_path / f"{name}-train.log", kind="train",
                then=lambda path: registered.write_text(path)),
            Job("cell", flaky, (str(registered), str(tmp_path / f"{name}-marker")), tmp_path / f"{name}-cell.log",
                after="train")], [], adapter


def test_the_driver_registers_an_adapter_before_its_cells_and_reruns_a_cell_it_recovered(tmp_path):
    """One job at a time in this process (on Ray: the next test's run)."""
    from diffmas_eval.leaderboard.runner.scheduler import run_in_order

    jobs, asked, adapter = driver_steps(tmp_path, "here")
    done = run_in_order(jobs, lambda job, error: asked.append((job.name, str(error))) or True)
    assert done == {"train": str(adapter), "cell": True} and asked == [("cell", "the server died")]


def interval(seconds: float) -> tuple[float, float, dict]:
    """A job: when it ran (it sleeps ``seconds``) and where (``placement``: its GPU ids and process id)."""
    from diffmas_eval.leaderboard.runner.scheduler import placement

    t0 = time.time()
    time.sleep(seconds)
    return t0, time.time(), placement()


def test_gpu_jobs_get_fresh_processes_and_a_lora_latent_cell_runs_beside_no_other_served_cell(cluster, tmp_path):
    """More GPU jobs than declared GPUs: each runs in a process of its own (``max_calls=1``), so none inherits a
    CUDA context made for another job's GPU. vLLM's worker dies on a batch mixing a LoRA request's prompt
    embeddings with token ids: on Ray, cells share the one server, so such a cell asks for all of the server's
    resource (``serve.server_resources``) and the others one slot each. A resource no node offers is refused
    before anything runs. In the same run: a training the driver registers before its cell is submitted, and that
    cell, failed once, rerun (``driver_steps``)."""
    from diffmas_eval.leaderboard.runner.scheduler import Job, PlacementError, Resources, run_jobs
    from diffmas_eval.leaderboard.runner.serve import server_resources

    assert server_resources("diffmas") != server_resources("single-sft") == server_resources("latentmas")
    steps, asked, adapter = driver_steps(tmp_path, "ray")
    jobs = [Job(f"{m} x gsm8k", interval, (1.5,), tmp_path / f"{m}.log", resources=server_resources(m))
            for m in ("single", "diffmas", "textmas")]
    done = run_jobs([*steps, *jobs], Resources(threads=1, gpus_per_cell=1, gpus_per_training=0, store=tmp_path,
                                               retry=lambda job, error: asked.append((job.name, str(error))) or True))
    assert done.pop("train") == str(adapter) and done.pop("cell") is True and asked == [("cell", "the server died")]
    pids = [where["pid"] for _, _, where in done.values()]
    assert len(set(pids)) == 3 and os.getpid() not in pids, pids
    assert all(len(where["gpu_ids"]) == 1 for _, _, where in done.values())
    lora, others = done["diffmas x gsm8k"], [done["single x gsm8k"], done["textmas x gsm8k"]]
    assert all(end <= lora[0] or start >= lora[1] for start, end, _ in others), done
    with pytest.raises(PlacementError, match="jobs ask for Ray resource\\(s\\) no_such_server that no node offers"):
        run_jobs([Job("x", interval, (0.0,), tmp_path / "x.log", resources={"no_such_server": 1})],
                 Resources(threads=1, gpus_per_cell=0, store=tmp_path))


def test_a_cell_starts_after_its_adapter(on_ray):
    adapter = next((on_ray / "cache" / "adapters").glob("diffmas-*"))
    trained = json.loads((adapter / "diffmas.json").read_text())["training"]["placement"]
    assert trained["gpu_ids"] == [] and trained["device"] == "cpu"  # --gpus-per-training 0
    marker = (adapter / "leaderboard-adapter.json").stat().st_mtime
    assert cell_meta(on_ray)["diffmas"]["started"] >= marker - 0.5


def test_same_numbers_and_adapters_as_one_at_a_time(on_ray, in_order):
    assert rows(on_ray) == rows(in_order)
    ours = sorted((on_ray / "cache" / "adapters").glob("*/adapter_model.safetensors"))
    assert ours
    for adapter in ours:
        twin = in_order / "cache" / "adapters" / adapter.parent.name / adapter.name
        assert twin.read_bytes() == adapter.read_bytes()


def test_a_killed_worker_is_retried_with_the_same_numbers(on_ray, tiny_path, tmp_path):
    """SIGKILL the worker of a running cell (its pid is the log's first line): Ray retries the task."""
    out = tmp_path / "killed"
    logs = out / "cache" / "logs"
    killed: list[int] = []

    def kill_first_worker() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            for log in logs.glob("single-*.log") if logs.exists() else []:
                text = log.read_text(errors="replace")
                if text.startswith("[worker pid"):
                    time.sleep(1.0)  # mid-job: past the start, before the scores
                    pid = int(text.split()[2])
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_first_worker, daemon=True)
    killer.start()
    assert main(["leaderboard", "--model", str(tiny_path), *ARGS[:1], "single", *ARGS[2:], "--jobs", "2",
                 "--output", str(out / "leaderboard.csv")]) == 0
    killer.join()
    assert killed
    log = next(logs.glob("single-*.log")).read_text()
    assert log.count("[worker pid") == 2  # the killed attempt and the retry, in the job's one log
    single = {k: v for k, v in rows(on_ray).items() if k[0] == "single"}
    assert rows(out) == single


def test_a_killed_worker_leaves_no_training_process_and_the_retry_trains_the_same_adapter(cluster, tiny_path,
                                                                                            data_dir, tmp_path):
    """SIGKILL the worker of a 2-process training (accelerate launch, DDP over gloo) while its ranks train: the
    launcher, which dies with its worker (``PR_SET_PDEATHSIG``), and the ranks, which die with the launcher, are
    gone; the retried training finishes the adapter of the same settings."""
    import psutil

    from diffmas_eval.commands.cli import build_parser
    from diffmas_eval.leaderboard.cli import settings_of
    from diffmas_eval.leaderboard.grid.settings import short_hash
    from diffmas_eval.leaderboard.grid.trainings import finished, sft_set
    from diffmas_eval.leaderboard.runner.scheduler import Job, Resources, run_jobs
    from diffmas_eval.leaderboard.runner.train import train_adapter

    settings = settings_of(build_parser().parse_args(["leaderboard", "--model", str(tiny_path), *ARGS,
                                                      "--train-steps", "24"]))
    work = tmp_path / "cache"
    data, _, _ = sft_set("commonsense", 4, work, str(data_dir), settings.recipe_settings()["data"])
    log = work / "logs" / "train.log"
    killed: list[psutil.Process] = []

    def kill_mid_training() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            text = log.read_text(errors="replace") if log.exists() else ""
            if text.startswith("[worker pid") and "'loss'" in text:  # the ranks are past their first step
                worker = psutil.Process(int(text.split()[2]))
                family = [worker, *worker.children(recursive=True)]
                ranks = [p for p in family if "diffmas_eval.training.sft" in " ".join(p.cmdline())]
                if len(ranks) >= 2:
                    os.kill(worker.pid, signal.SIGKILL)
                    killed.extend(family)
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_mid_training, daemon=True)
    killer.start()
    job = Job("train", train_adapter, (settings, "diffmas", "commonsense", data.resolve(), work.resolve(), False, 1, 2),
              log, kind="train")
    done = run_jobs([job], Resources(threads=1, gpus_per_training=0, store=tmp_path))
    killer.join()
    assert killed, log.read_text()[-3000:]
    _, alive = psutil.wait_procs(killed, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    digest = short_hash(settings.training("diffmas", "commonsense"))
    assert done["train"].name == f"diffmas-commonsense-{digest}" and finished(done["train"], digest)
    assert log.read_text().count("[worker pid") == 2  # the killed attempt and the retry


def test_bad_placement_is_refused_before_anything_runs(cluster, tiny_path, tmp_path, capsys):
    from diffmas_eval.leaderboard.runner.scheduler import PlacementError, check_store
    from diffmas_eval.leaderboard.runner.scheduler import cluster as nodes

    assert leaderboard(tiny_path, tmp_path, "--gpus-per-cell", "3") == 2
    assert "--gpus-per-cell 3: no node has that many GPUs (the most on one node: 2; GPUs per node: " in \
        capsys.readouterr().err
    assert leaderboard(tiny_path, tmp_path, "--gpus-per-training", "4") == 2
    assert "--gpus-per-training 4: no node has that many GPUs" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache" / "adapters").exists()
    t0 = time.perf_counter()
    assert leaderboard(tiny_path, tmp_path, "--ray-address", "127.0.0.1:9") == 2
    assert "cannot reach Ray at 127.0.0.1:9" in capsys.readouterr().err
    os.environ["RAY_ADDRESS"] = "127.0.0.1:10"  # the variable, as `RAY_ADDRESS=... make leaderboard` sets it
    try:
        assert leaderboard(tiny_path, tmp_path) == 2
    finally:
        del os.environ["RAY_ADDRESS"]
    assert "cannot reach Ray at 127.0.0.1:10" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 30
    with pytest.raises(PlacementError, match=r"/no/such/store: cannot write a check file there"):
        check_store(Path("/no/such/store"), nodes())


def test_the_store_check_reads_a_nonce_under_the_output_and_the_work_directory(cluster, tmp_path):
    """Not a common parent (``/`` for ``/shared/out`` and ``/scratch/cache``) nor a directory's name: each node reads
    back what the driver wrote under each directory, and the check files are gone afterwards."""
    from diffmas_eval.leaderboard.runner.placement import store_of
    from diffmas_eval.leaderboard.runner.scheduler import check_store
    from diffmas_eval.leaderboard.runner.scheduler import cluster as nodes

    assert store_of(Path("/shared/out/lb.csv"), Path("/scratch/cache")) == (Path("/shared/out"), Path("/scratch/cache"))
    assert store_of(tmp_path / "lb.csv", tmp_path) == (tmp_path.resolve(),)
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    assert check_store((out, work), nodes()) == {n["id"]: True for n in nodes()}
    assert not list(out.iterdir()) and not list(work.iterdir())


def test_plan_prints_jobs_memory_and_measured_hours_and_runs_nothing(on_ray, tiny_path, capsys):
    from diffmas_eval.leaderboard.grid.plan import JobPlan, check_fit

    before = sorted(p.name for p in (on_ray / "runs").rglob("*.json"))
    assert leaderboard(tiny_path, on_ray, "--plan", "--limit", "3", "--jobs", "3", "--gpus-per-training", "0") == 0
    printed = capsys.readouterr().out
    assert "plan: 1 training(s), 3 cell(s) to run on " in printed and "2 GPU / 3 CPU" in printed
    assert re.search(r"\n  single x diffmas_arc_challenge +1 GPU 1 CPU  peak ~", printed)
    assert "GPU-h" in printed and "for the 3 cell(s) with a measured per-token rate" in printed  # earlier rates
    assert sorted(p.name for p in (on_ray / "runs").rglob("*.json")) == before
    with pytest.raises(ValueError, match=r"single x gsm8k: needs about 2.0 KiB .* \(H100, 1,000 B\)"):
        check_fit([JobPlan("single x gsm8k", "cell", 1, 1, 1024, 1024)], ("H100", 1000))


def test_a_job_no_gpu_can_hold_is_refused_before_anything_runs(cluster, tiny_path, tmp_path, capsys):
    """Declared GPUs have no memory to ask; ``--gpu-memory`` gives it, and the run refuses the first job whose
    estimate exceeds it, naming the job, the estimate and the GPU, before any training or cell."""
    assert leaderboard(tiny_path, tmp_path, "--jobs", "2", "--gpu-memory", "0.000001") == 2
    err = capsys.readouterr().err
    assert re.search(r"train diffmas \(commonsense\): needs about [\d.]+ [KM]iB of accelerator memory \(weights "
                     r"[\d.]+ [KM]iB \+ cache [\d.]+ [KM]iB\), more than the largest GPU has \(GPU of "
                     r"--gpu-memory, 1.0 KiB\)", err), err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache" / "adapters").exists()


# -- diffmas-eval ablate on the same Ray: one latent-steps value, untrained and trained, one seed -----------------
ABLATE = ["ablate", "--axes", "latent_steps", "--latent-steps", "0", "--ref-agents", "2", "--ref-steps", "0",
          "--seeds", "1", "--train-steps", "2", "--train-batch-size", "1", "--limit", "2", "--probe-rows", "1",
          "--train-max-length", "2048", "--batch-size", "2", "--threads", "1"]


def ablate(model: Path, out: Path, *extra: str) -> int:
    return main([*ABLATE, "--model", str(model), "--output", str(out / "ablations.csv"), *extra])


@pytest.fixture(scope="module")
def ablated(cluster, tiny_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate")
    assert ablate(tiny_path, out, "--jobs", "3", "--gpus-per-training", "0") == 0
    return out


def test_ablate_runs_its_jobs_on_the_declared_gpus(ablated):
    meta = cell_meta(ablated)
    assert set(meta) == {"latentmas", "diffmas"}
    for m in meta.values():  # each cell asked for one GPU (the default where the cluster has GPUs)
        assert m["placement"]["gpu_ids"] in (["0"], ["1"]) and m["placement"]["device"] == "cpu"
    adapter = next((ablated / "cache" / "adapters").glob("diffmas-*"))
    assert json.loads((adapter / "diffmas.json").read_text())["training"]["placement"]["gpu_ids"] == []
    assert meta["diffmas"]["started"] >= (adapter / "leaderboard-adapter.json").stat().st_mtime - 0.5
    assert len(list((ablated / "runs" / "probes").glob("probe-*.json"))) == 2  # step 0 and after training
    assert {r["method"] for r in csv.DictReader(open(ablated / "ablations.csv", newline=""))} == {
        "latentmas", "diffmas"}


def test_ablate_plans_and_refuses_as_the_leaderboard_does(cluster, tiny_path, tmp_path, capsys):
    assert ablate(tiny_path, tmp_path, "--plan", "--gpus-per-training", "0") == 0
    printed = capsys.readouterr().out
    assert "plan: 1 training(s), 2 cell(s), 2 gradient probe(s) to run on " in printed and "2 GPU / 3 CPU" in printed
    assert re.search(r"\n  train latent_steps=0 \(trained\) seed 1 \[\w+\] +0 GPU 1 CPU  peak ~", printed)
    assert not (tmp_path / "runs").exists()
    assert ablate(tiny_path, tmp_path, "--plan", "--gpu-memory", "0.000001") == 2
    assert "more than the largest GPU has (GPU of --gpu-memory, 1.0 KiB)" in capsys.readouterr().err
    assert ablate(tiny_path, tmp_path, "--gpus-per-cell", "3") == 2
    assert "--gpus-per-cell 3: no node has that many GPUs (the most on one node: 2; " in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache" / "adapters").exists()


def test_ctrl_c_cancels_the_jobs_and_their_children(cluster, tiny_path, tmp_path):
    """SIGINT to a leaderboard (a second driver on the module's Ray) while a training runs ``accelerate launch``:
    the task is cancelled and no process it started is left."""
    import subprocess
    import sys

    import psutil

    out = tmp_path / "interrupted"
    # the module's Ray is on loopback: the second driver looks for its node there too (Ray's single-machine mode)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    cmd = [sys.executable, "-m", "diffmas_eval.commands.cli", "leaderboard", "--model", str(tiny_path), *ARGS[:1],
           "diffmas", *ARGS[2:], "--train-steps", "200", "--jobs", "2", "--output", str(out / "leaderboard.csv")]
    # SIGINT as a terminal delivers it: a suite started in the background by a non-interactive shell (`... &`)
    # runs with SIGINT ignored, which every child inherits, and then Python never raises KeyboardInterrupt
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        log, started = out / "cache" / "logs" / "train-diffmas-commonsense.log", []
        deadline = time.time() + 240
        while time.time() < deadline and not started and driver.poll() is None:
            if log.exists() and log.read_text().startswith("[worker pid"):
                worker = psutil.Process(int(log.read_text().split()[2]))
                started = [p for p in worker.children(recursive=True) if "accelerate" in " ".join(p.cmdline())]
            time.sleep(0.5)
        if not started:
            driver.kill()
        assert started, driver.communicate(timeout=60)[0][-3000:]
        family = [worker, *worker.children(recursive=True)]
        driver.send_signal(signal.SIGINT)
        printed = driver.communicate(timeout=120)[0]
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode != 0 and "interrupted: cancelling" in printed, printed[-4000:]
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
