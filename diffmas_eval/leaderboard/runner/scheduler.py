"""Cells and adapter trainings as Ray tasks (``diffmas-eval leaderboard`` / ``ablate`` with ``--jobs N``, GPUs or a
cluster).

Why Ray: one machine's process pool sent every job to GPU 0 and could not reach a second node. Ray gives each task
the GPUs it asks for (its own ``CUDA_VISIBLE_DEVICES``), the same on one node or many, and runs a task whose
argument is another task's result only once that result exists: a trained method's cells wait for their adapter
without a polling loop, and everything else starts at once, as far as the resources go.

Each job runs in a Ray worker process with its own torch threads, its output (lm-eval's, the trainer's, the
subprocesses': ``accelerate launch``, EvalPlus) redirected at the file-descriptor level to its own log; the driver
prints one line when a job starts and when it ends. A worker that dies (killed, out of memory) is retried
``max_retries`` times. When a job fails for good, nothing new starts (a job that has not started yet finds the
run's stop file and returns at once), the running ones finish (their cells are kept, a rerun reuses them), and the
error names the job and shows the tail of its log. Ctrl-C cancels every task (a running one is interrupted and
kills the processes it started) and shuts down the Ray this run started.

Every job, and each start-up probe, runs in a fresh worker process (``max_calls=1``): torch reads
``CUDA_VISIBLE_DEVICES`` once, when CUDA starts, so a reused worker would run its next job on the GPU of its first
(Ray's issue 3245). Ray only defaults to that for a function whose decorator names ``num_gpus``; ours set their GPUs
per call (``.options()``, which cannot set ``max_calls``), so they say it themselves.

Where a job ran is recorded with its result (``placement()``: node, GPU ids, device, the worker's process id) and
never enters a hash.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from ...extras import require

PLACEMENT_ENV = "DIFFMAS_PLACEMENT"  # set in a worker for the job it runs; read by placement()
# what a worker needs of the driver's environment to resolve the model, the data and its threads as the driver does
FORWARDED = ("DIFFMAS_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
             "TOKENIZERS_PARALLELISM", "PYTHONPATH")
SKIPPED = "skipped: the run stopped before this job started"


class PlacementError(ValueError):
    """Bad input about where jobs run (an unreachable cluster, a store a node cannot see): refused at start-up, in
    one line, like any other bad flag."""


@dataclass
class Job:
    name: str
    fn: Callable  # a module-level function (it is pickled to the worker)
    args: tuple
    log: Path
    after: str | None = None  # the job whose result is passed as the ``adapter`` keyword
    kind: str = "cell"  # "train" or "cell": which of --gpus-per-training / --gpus-per-cell it asks for
    what: tuple = ()  # what it computes, for --plan's estimate (plan.plan_of): ("train" | "probe", settings) or
    # ("cell", settings, method, task)
    resources: dict = field(default_factory=dict)  # custom Ray resources it asks for (a served cell: its server)
    then: Callable | None = None  # run by the driver on the result before the jobs waiting for it are submitted
    # (a served run registers a new adapter with its server once, there, instead of racing from each cell)


@dataclass
class Resources:
    """How jobs are placed. ``address``: a running Ray (default ``$RAY_ADDRESS``; neither: a local Ray with this
    machine's CPUs and GPUs, shut down at the end); ``jobs``: at most this many at once (None: the resources
    decide); ``threads``: CPUs per job (default 1); ``gpus_per_cell`` / ``gpus_per_training``: None = 1 where the
    cluster has GPUs, else 0; ``store``: the directories every node must see (checked at start-up); ``gpu_memory``:
    bytes of the largest GPU, given (None: asked from each node's torch)."""

    address: str | None = None
    jobs: int | None = None
    threads: int | None = None
    gpus_per_cell: float | None = None
    gpus_per_training: int | None = None
    max_retries: int = 2
    store: Path | tuple[Path, ...] | None = None
    env: dict = field(default_factory=dict)
    gpu_memory: int | None = None
    fits: Callable | None = None  # fits((gpu name, bytes) | None, per_cell, per_training): raises if a job cannot
    # retry(job, error) -> bool, asked once per failed job: True reruns it (a served cell whose server died and was
    # restarted by the driver, which owns the server)
    retry: Callable | None = None
    custom: dict = field(default_factory=dict)  # custom resources a local Ray started here declares (the server's)


def placement() -> dict:
    """Where this process runs its job: the node, the GPU ids Ray assigned, the device's name and the process id
    (``pid``: a run's records show that no two GPU jobs shared a worker, so none ran on another job's device)."""
    given = os.environ.get(PLACEMENT_ENV)
    if given:  # a Ray worker: the node and GPU ids Ray gave this job; the device's name asked once torch is in use
        where = json.loads(given)
        return {**where, "device": where.get("device") or _device_name(), "pid": os.getpid()}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    gpu_ids = [x for x in visible.split(",") if x.strip()]
    return {"node": socket.gethostname(), "gpu_ids": gpu_ids, "device": _device_name(), "pid": os.getpid()}


def _device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


# credentials: never in a runtime_env, which Ray records in its job and task metadata (the dashboard, ``ray list
# jobs``/``tasks --detail``, ``ray job status``) for anyone who can reach the cluster to read
SECRETS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_TOKEN")


def forwarded_env(extra: dict | None = None) -> dict[str, str]:
    """The driver's variables that decide what a worker resolves (data dir, hub cache, threads); not its
    credentials (``secrets``)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED) and k != PLACEMENT_ENV}
    env.update(extra or {})
    return {k: v for k, v in env.items() if k not in SECRETS}


def secrets(extra: dict | None = None) -> dict[str, str]:
    """The driver's hub token(s), handed to each job as an argument of its task (held in Ray's object store, shown
    by none of its metadata) and set in the job's environment there: a gated model loads on every node."""
    env = {**os.environ, **(extra or {})}
    return {k: env[k] for k in SECRETS if env.get(k)}


def _kill_children() -> None:
    """End the processes this worker started (``accelerate launch``, EvalPlus's pool): an interrupted job leaves
    none behind."""

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=5)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def _run(fn: Callable, args: tuple, log: str, threads: int | None, stop: str, adapter=None,
         secret: dict | None = None):
    """One job in a Ray worker: its threads, its placement, its output in its log; ``secret``: the driver's hub
    token (``secrets``), set in this process's environment (its own: the worker ends with the job)."""
    import ray  # optional extra: leaderboard

    if Path(stop).exists():
        return SKIPPED
    os.environ.update(secret or {})
    if threads:

        os.environ["OMP_NUM_THREADS"] = str(threads)  # the job's own subprocesses
        torch.set_num_threads(threads)
    ctx = ray.get_runtime_context()
    where = {"node": socket.gethostname(), "node_id": ctx.get_node_id(),
             "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}
    os.environ[PLACEMENT_ENV] = json.dumps(where)
    kwargs = {} if adapter is None else {"adapter": adapter}
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:  # the worker's pid: what a test (or a person) kills to see the retry
        f.write(f"[worker pid {os.getpid()} on {where['node']}, GPU ids {where['gpu_ids'] or 'none'}]\n")
    try:
        return _logged(fn, args, kwargs, log)
    except BaseException:  # interrupted (ray.cancel) or failed: nothing it started outlives it
        _kill_children()
        raise
    finally:
        os.environ.pop(PLACEMENT_ENV, None)


def _logged(fn: Callable, args: tuple, kwargs: dict, log: str):
    """Run ``fn`` with this process's stdout and stderr (fds 1 and 2) appended to ``log``, then restore them."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        return fn(*args, **kwargs)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def _tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """An unreachable address fails here, within seconds, naming it (``ray.init`` alone retries for minutes)."""
    if address == "auto":
        return
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        raise PlacementError(f"cannot reach Ray at {address} ({type(e).__name__}: {e}); start it "
                              "(`ray start --head`) or drop --ray-address / RAY_ADDRESS for a local Ray") from e


def connect(res: Resources) -> bool:
    """Connect to the cluster (or start a local Ray); return whether this call started Ray (then it is ours to shut
    down)."""

    ray = require("ray")
    address = res.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _check_reachable(address)
    if ray.is_initialized():
        return False
    if address:
        join(address, runtime_env={"env_vars": forwarded_env(res.env)})
        return False
    cpus = os.cpu_count() or 1
    if res.jobs:  # --jobs N on this machine: N jobs of --threads CPUs fit, and no more
        cpus = res.jobs * (res.threads or 1)
    # its workers inherit this process's environment: no runtime_env to set up
    start_local(num_cpus=cpus, resources=res.custom or None)
    return True


def loopback(address: str) -> bool:
    """Whether ``address`` names a Ray bound to this machine's loopback (``ray start --head --node-ip-address
    127.0.0.1``)."""
    if address.startswith("ray://"):  # Ray Client: no local node to find
        return False
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def join(address: str, **kwargs) -> None:
    """Join the running Ray at ``address`` with the cluster's authentication, as Ray's own ``ray start --head``
    decides it: Ray 2.60 writes ``~/.ray/auth_token`` the first time a local Ray starts, and from then on ``ray
    start --head`` turns token authentication on, while ``ray.init(address=...)`` keeps it off unless
    ``RAY_AUTH_MODE=token`` is set ("InvalidAuthToken"). So where ``RAY_AUTH_MODE`` is unset and a token exists
    (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN_PATH``, ``RAY_AUTH_TOKEN``), this driver sends it: a cluster
    without authentication ignores it. A head on loopback is joined in Ray's single-machine mode (cluster mode
    would look for this driver's node at the machine's interface address, where nothing listens)."""
    import ray  # optional extra: leaderboard

    from ...compat.ray import join_on_loopback, use_cluster_token_auth  # optional extra: leaderboard

    use_cluster_token_auth()  # respects an explicit RAY_AUTH_MODE
    if not loopback(address):
        ray.init(address=address, log_to_driver=False, **kwargs)
        return
    join_on_loopback(address, log_to_driver=False, **kwargs)


def start_local(**kwargs) -> None:
    """A Ray for this machine alone, on loopback: nothing outside it can reach it (a cluster is started with
    ``ray start``, docs/leaderboard.md). ``ray.init`` turns 127.0.0.1 into the machine's address unless Ray's
    single-machine mode is on, so it is switched on for this call; and ``address="local"``: a new one, even where
    a ``ray start`` on this machine left its address file (``ray.init()`` would join that cluster instead)."""
    from ...compat.ray import init_on_loopback  # optional extra: leaderboard

    # Ray runs its workers at niceness 15, as if they were background work; here they are the work, and at 15 they
    # lose the CPU to anything else on the machine (a reduced grid took 1.48x the process pool's time here)
    os.environ.setdefault("RAY_worker_niceness", "0")
    # not Ray's kill_child_processes_on_worker_exit_with_raylet_subreaper: Ray applies it to the driver too, which
    # then exits 0 when Ctrl-C interrupts it (even from sys.exit(130)); a dead worker's trainer ends with it through
    # PR_SET_PDEATHSIG instead (training/lifetime.py)
    init_on_loopback(include_dashboard=False, log_to_driver=False, **kwargs)


def cluster() -> list[dict]:
    """The live nodes: ``{"node", "id", "ip", "cpus", "gpus", "name"}`` each (``name``: how an error names it, the
    hostname with the node's address and id, since several nodes may share a host)."""
    import ray  # optional extra: leaderboard

    nodes = [{"node": n.get("NodeManagerHostname", n["NodeID"]), "id": n["NodeID"],
              "ip": n.get("NodeManagerAddress", ""), "cpus": n["Resources"].get("CPU", 0),
              "gpus": n["Resources"].get("GPU", 0)} for n in ray.nodes() if n.get("Alive")]
    for n in nodes:
        n["name"] = f"{n['node']} ({n['ip']}, node id {n['id'][:8]})"
    return nodes


def gpu_requests(res: Resources, nodes: list[dict]) -> tuple[float, int]:
    """GPUs per cell and per training, defaulted from the cluster and refused (with the numbers) when no node has
    that many, before anything runs."""
    most = max((n["gpus"] for n in nodes), default=0)
    where = ", ".join(f"{n.get('name', n['node'])}: {n['gpus']:g}" for n in nodes)
    per_cell = res.gpus_per_cell if res.gpus_per_cell is not None else (1 if most else 0)
    per_training = res.gpus_per_training if res.gpus_per_training is not None else (1 if most else 0)
    if per_cell < 0 or per_training < 0:
        raise ValueError(f"GPUs per job must be >= 0 (--gpus-per-cell {per_cell}, --gpus-per-training {per_training})")
    if per_cell > 1 and per_cell != int(per_cell):
        raise ValueError(f"--gpus-per-cell {per_cell}: a fraction shares one GPU; more than one must be whole")
    for flag, asked in (("--gpus-per-cell", per_cell), ("--gpus-per-training", per_training)):
        if asked > most:
            raise ValueError(f"{flag} {asked:g}: no node has that many GPUs (the most on one node: {most:g}; "
                             f"GPUs per node: {where})")
    return per_cell, per_training


def _gpu_here() -> tuple[str, int] | None:
    if not torch.cuda.is_available():
        return None  # declared GPUs (``ray start --num-gpus``) without a device behind them
    props = torch.cuda.get_device_properties(0)
    return props.name, props.total_memory


def largest_gpu(nodes: list[dict], given: int | None = None) -> tuple[str, int] | None:
    """The name and memory of the largest GPU of the cluster: ``given`` (bytes, ``--gpu-memory``), else a task on
    one GPU of each node that has some asks its torch (declared GPUs without a device answer nothing)."""
    if given:
        return "GPU of --gpu-memory", given
    import ray  # optional extra: leaderboard
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # optional extra: leaderboard

    probe = ray.remote(max_calls=1)(_gpu_here)  # CUDA started here stays in its process: not a job's worker
    refs = [probe.options(num_gpus=1, num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["id"], soft=False)).remote() for n in nodes if n["gpus"] >= 1]
    found = [g for g in ray.get(refs, timeout=300) if g]
    return max(found, key=lambda g: g[1]) if found else None


def _reads(checks: list[tuple[str, str]]) -> tuple[str, list[bool]]:
    """Run on one node: its Ray node id, and for each (file, nonce) whether the file there holds that nonce."""
    import ray  # optional extra: leaderboard

    seen = []
    for path, nonce in checks:
        try:
            seen.append(Path(path).read_text() == nonce)
        except OSError:
            seen.append(False)
    return ray.get_runtime_context().get_node_id(), seen


def check_store(store: Path | Sequence[Path], nodes: list[dict]) -> dict[str, bool]:
    """Every node must see the directories the driver writes (the output's: cells, logs; the work directory:
    adapters, SFT sets, caches): on a cluster, a shared filesystem. A directory of the same name is not proof, nor
    is a common parent (the output on ``/shared`` and the work directory on a node's ``/scratch`` have ``/`` in
    common), so the driver writes a nonce under each directory and a task on each node reads it back. Returns, by
    the id of the node each task ran on, whether it read every nonce; a node that cannot is named, at start-up."""
    import ray  # optional extra: leaderboard
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # optional extra: leaderboard

    dirs = [store] if isinstance(store, Path) else list(dict.fromkeys(store))
    checks: list[tuple[Path, str]] = []
    try:
        for d in dirs:
            nonce = uuid.uuid4().hex
            path = Path(d) / f".diffmas-store-check-{nonce[:12]}"
            try:
                path.write_text(nonce)
            except OSError as e:
                raise PlacementError(f"{d}: cannot write a check file there ({type(e).__name__}: {e}); the output "
                                     "and work directories must be writable by this driver") from e
            checks.append((path, nonce))
        probe = ray.remote(max_calls=1)(_reads)
        refs = [probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["id"], soft=False)).remote([(str(p), nonce) for p, nonce in checks]) for n in nodes]
        seen = dict(ray.get(refs, timeout=120))
    finally:
        for path, _ in checks:
            path.unlink(missing_ok=True)
    for k, d in enumerate(dirs):
        blind = [n.get("name", n["node"]) for n in nodes if not seen.get(n["id"], [False] * len(dirs))[k]]
        if blind:
            raise PlacementError(f"{d}: not visible from node(s) {', '.join(blind)}; on a cluster the output and "
                                 "work directories must be on a filesystem every node mounts at the same path")
    return {node: all(found) for node, found in seen.items()}


def survey(res: Resources) -> tuple[list[dict], float, int, tuple[str, int] | None]:
    """What ``--plan`` shows of the cluster a run would use: its nodes, the GPUs each cell and training would ask
    for, and its largest GPU (a Ray started for this is shut down again)."""
    nodes: list[dict] = []
    if wants_ray(res):
        import ray  # optional extra: leaderboard

        started = connect(res)
        try:
            nodes = cluster()
            per_cell, per_training = gpu_requests(res, nodes)
            return nodes, per_cell, per_training, largest_gpu(nodes, res.gpu_memory)
        finally:
            if started:
                ray.shutdown()
    per_cell, per_training = gpu_requests(res, nodes)
    return nodes, per_cell, per_training, largest_gpu(nodes, res.gpu_memory)


def wants_ray(res: Resources) -> bool:
    """Ray unless this is one job at a time on a machine without GPUs and no cluster is named: then the jobs run in
    this process, one after another, as they always did (no Ray to start, a debugger works)."""

    if res.jobs not in (None, 1) or res.address or os.environ.get("RAY_ADDRESS"):
        return True
    if res.gpus_per_cell or res.gpus_per_training or torch.cuda.device_count():
        return True
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def run_in_order(jobs: list[Job], retry: Callable | None = None) -> dict[str, object]:
    """``wants_ray`` is false: each job here, in order, its output on this terminal as it was (``Job.then`` and
    ``Resources.retry`` as on Ray)."""
    results: dict[str, object] = {}
    for job in jobs:
        kwargs = {"adapter": results[job.after]} if job.after else {}
        print(f"\n[{len(results) + 1}/{len(jobs)}] {job.name}", flush=True)
        try:
            value = job.fn(*job.args, **kwargs)
        except Exception as e:
            if retry is None or not retry(job, e):
                raise
            print(f"[again] {job.name}: {type(e).__name__}: {_first_line(e)}", flush=True)
            value = job.fn(*job.args, **kwargs)
        if job.then is not None:
            job.then(value)
        results[job.name] = value
    return results


def run_jobs(jobs: list[Job], res: Resources) -> dict[str, object]:
    """Run ``jobs`` as Ray tasks; return each job's result by name (a job that never started is absent)."""
    if not wants_ray(res):
        return run_in_order(jobs, res.retry)

    ray = require("ray")
    names = {j.name for j in jobs}
    missing = [j.after for j in jobs if j.after and j.after not in names]
    if missing:
        raise ValueError(f"jobs wait for unknown job(s) {missing}")
    started_ray = connect(res)
    try:
        nodes = cluster()
        per_cell, per_training = gpu_requests(res, nodes)
        if res.fits is not None:
            res.fits(largest_gpu(nodes, res.gpu_memory), per_cell, per_training)
        if res.store is not None:
            stores = (res.store,) if isinstance(res.store, Path) else res.store
            for d in stores:
                d.mkdir(parents=True, exist_ok=True)  # made here, so only another node can miss it
            check_store(stores, nodes)
        offered = ray.cluster_resources()
        unknown = sorted({k for j in jobs for k, v in j.resources.items() if offered.get(k, 0) < v})
        if unknown:
            raise PlacementError(f"jobs ask for Ray resource(s) {', '.join(unknown)} that no node offers in that "
                                 f"amount (this Ray: {', '.join(sorted(offered))}); a served run declares its "
                                 "server's when it starts its own Ray, so run it without a Ray of your own")
        return _schedule(jobs, res, per_cell, per_training, started_ray)
    finally:
        if started_ray:
            ray.shutdown()


def _schedule(jobs: list[Job], res: Resources, per_cell: float, per_training: int,
              started_ray: bool) -> dict[str, object]:
    import ray  # optional extra: leaderboard

    t0 = time.perf_counter()
    logs = {j.log.parent for j in jobs}
    for d in logs:
        d.mkdir(parents=True, exist_ok=True)
    stop = next(iter(logs)) / f".stop-{uuid.uuid4().hex[:12]}" if jobs else Path("/nonexistent")
    remote = ray.remote(max_calls=1)(_run)  # a fresh process per job (the module's docstring says why)
    # a Ray this run did not start: each task carries the driver's environment (workers of a Ray it started
    # inherit it)
    env = {} if started_ray else {"runtime_env": {"env_vars": forwarded_env(res.env)}}
    token = None if started_ray else ray.put(secrets(res.env))  # not in the runtime_env: its metadata shows it
    refs: dict[str, object] = {}  # job name -> ObjectRef
    by_ref: dict = {}
    results: dict[str, object] = {}
    failed: dict[str, BaseException] = {}
    pending = list(jobs)
    # --jobs on a Ray this run did not start: at most that many submitted (a job waits for its adapter outside Ray
    # then, so that it holds no slot); a local Ray was sized to it, and there the resources decide
    cap = res.jobs if res.jobs and not started_ray else None

    def submit(job: Job) -> None:
        gpus = per_training if job.kind == "train" else per_cell
        opts = {"num_cpus": res.threads or 1, "num_gpus": gpus, "max_retries": res.max_retries,
                "name": job.name, **env, **({"resources": job.resources} if job.resources else {})}
        adapter = refs[job.after] if job.after else None  # a task dependency: starts once the adapter exists
        ref = remote.options(**opts).remote(job.fn, job.args, str(job.log), res.threads, str(stop), adapter,
                                            token)
        refs[job.name], by_ref[ref] = ref, job
        print(f"[queued {len(refs)}/{len(jobs)}] {job.name} ({gpus:g} GPU, {res.threads or 1} CPU; log {job.log})",
              flush=True)

    by_name = {j.name: j for j in jobs}
    retried: set[str] = set()

    def can_submit(j: Job) -> bool:
        """Its adapter exists (a task dependency on Ray), or, with a cap or a driver's step after the adapter's
        job (``Job.then``), has been seen by the driver."""
        if j.after is None or j.after in failed:
            return True
        return j.after in (results if cap or by_name[j.after].then else refs)

    try:
        while pending or by_ref:
            while pending and (cap is None or len(by_ref) < cap):
                job = next((j for j in pending if can_submit(j)), None)
                if job is None:
                    break
                pending.remove(job)
                if job.after in failed:
                    continue
                submit(job)
            if not by_ref:
                break
            done, _ = ray.wait(list(by_ref), num_returns=1)
            for ref in done:
                job = by_ref.pop(ref)
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayError as e:
                    if job.after in failed:
                        print(f"[not run] {job.name}: {job.after} failed", flush=True)
                        failed[job.name] = e
                        continue
                    cause = getattr(e, "cause", None) or e
                    if isinstance(e, ray.exceptions.WorkerCrashedError):
                        cause = RuntimeError(f"its worker died {res.max_retries + 1} time(s) (killed or out of "
                                             "memory)")
                    if res.retry is not None and job.name not in retried and res.retry(job, cause):
                        retried.add(job.name)
                        print(f"[again] {job.name}: {type(cause).__name__}: {_first_line(cause)}", flush=True)
                        submit(job)
                        continue
                    print(f"[failed] {job.name}: {type(cause).__name__}: {_first_line(cause)}\n--- {job.log} "
                          f"(last lines)\n{_tail(job.log)}\n---", flush=True)
                    failed[job.name] = cause
                    stop.touch()  # the jobs not started yet return at once; the running ones finish
                    pending.clear()
                    continue
                if value == SKIPPED:
                    print(f"[not run] {job.name}: the run stopped", flush=True)
                    continue
                if job.then is not None:
                    try:
                        job.then(value)
                    except Exception as e:  # the jobs waiting for it cannot run: fail it, as its own error
                        print(f"[failed] {job.name}: after it ran: {type(e).__name__}: {_first_line(e)}", flush=True)
                        failed[job.name] = e
                        stop.touch()
                        pending.clear()
                        continue
                results[job.name] = value
                print(f"[done {len(results)}/{len(jobs)}] {job.name} ({time.perf_counter() - t0:.0f} s so far)",
                      flush=True)
    except KeyboardInterrupt:
        _cancel(list(by_ref), stop)
        raise
    finally:
        stop.unlink(missing_ok=True)
    first = next((name for name in failed if not any(j.name == name and j.after in failed for j in jobs)), None)
    if first is not None:
        job = next(j for j in jobs if j.name == first)
        error = failed[first]
        raise RuntimeError(f"{job.name} failed ({type(error).__name__}: {_first_line(error)}); its log: {job.log}. "
                           f"Finished jobs are kept: {len(results)}/{len(jobs)}; a rerun resumes from them") from error
    return results


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _cancel(refs: list, stop: Path) -> None:
    """Ctrl-C: nothing new starts, the running tasks are interrupted (and kill their children), then forced."""
    import ray  # optional extra: leaderboard

    stop.touch()
    print(f"\ninterrupted: cancelling {len(refs)} job(s)", flush=True)
    for ref in refs:
        ray.cancel(ref, force=False)
    _, left = ray.wait(refs, num_returns=len(refs), timeout=20)
    for ref in left:
        ray.cancel(ref, force=True)
