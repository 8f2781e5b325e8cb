"""The leaderboard's and the ablations' jobs as functions a worker runs: one cell, one training (where Ray placed
it, on the device it was given), a served cell's restart, the run's environment, and ``--plan``'s printout.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from ...models import load_model
from ...serving.stage2_vllm import PromptEmbedsBackend
from ...stopping import eos_ids
from ..grid.plan import JobPlan, check_fit, describe
from ..grid.settings import LAYOUT, Settings
from .placement import Placement
from .scheduler import survey
from .score import score
from .serve import Endpoint, ServedRun, ServeOptions, parallel_size, split_gpus, visible_gpus
from .train import train_adapter


def print_plan(plans: Callable[[float, int], list[JobPlan]], res, reserved: float = 0.0) -> None:
    """``--plan``: print the jobs with their resources, memory and time on the cluster the run would use, then
    refuse any that its share of a GPU cannot hold (``reserved``: what a vLLM server beside the jobs holds)."""

    nodes, per_cell, per_training, largest = survey(res)
    jobs = plans(per_cell, per_training)
    print(describe(jobs, nodes, largest), flush=True)
    check_fit(jobs, largest, reserved)


def run_environment(device: str | None, batch_size: str | int, data_dir: str | None,
                    threads: int | None) -> tuple[str, int | str]:
    """The device and batch size of a run, with its data directory and thread count set for this process and the
    jobs, trainings and EvalPlus runs it starts (``leaderboard`` and ``ablate`` alike)."""

    if data_dir:
        os.environ["DIFFMAS_DATA_DIR"] = str(Path(data_dir).resolve())
    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # EvalPlus's and accelerate's subprocesses
    batch: int | str = int(batch_size) if str(batch_size).isdigit() else batch_size
    return device or ("cuda" if torch.cuda.is_available() else "cpu"), batch


def score_cell(settings: Settings, method: str, task: str, runs: Path, work: Path, batch_size: int | str,
               device: str, adapter: Path | None, server: ServedRun | None) -> Path:
    """One cell in this process; a served cell whose server died is rerun once on a restarted server, resuming
    from lm-eval's request cache (``ServedRun.restart``)."""

    target = server.target(method, task, adapter) if server is not None else None
    try:
        return score(settings, method, task, runs, work, batch_size, device, adapter, target)
    except Exception:
        if target is None or not server.restart():
            raise
    print(f"   {method} x {task}: again on the restarted server (lm-eval's request cache keeps what was answered)",
          flush=True)
    return score(settings, method, task, runs, work, batch_size, device, adapter,
                       server.target(method, task, adapter))


def served_run(settings: Settings, serve: ServeOptions, python, device: str, work: Path) -> ServedRun:
    logs = Path(serve.log_dir) if serve.log_dir else work / "logs"
    return ServedRun(settings, serve, python, device, logs)


def preflight(server: ServedRun, settings: Settings, served: list[tuple[str, str]], device: str) -> None:
    """The server started, and for a served latent cell the stage-2 preflight run once on the base model: a model
    or layout vLLM cannot serve fails here, with the server's or the preflight's message, before any cell. The
    model is loaded in a child process (``stage2_preflight``): loaded here, the driver would keep its allocator's
    cache on the GPU that the server or the first job is given."""

    endpoint = server.endpoint()
    if not any(m in LAYOUT for m, _ in served):
        return
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        pool.submit(stage2_preflight, endpoint.url, endpoint.model, settings.model, device).result()


def stage2_preflight(url: str, served_model: str, model_name: str, device: str) -> int:
    """``PromptEmbedsBackend.preflight`` against the server at ``url`` with the base model loaded in this process
    (``preflight``'s child); returns this process's id (what shows where it ran)."""

    model, tokenizer = load_model(model_name, device=device)
    PromptEmbedsBackend(url, served_model).preflight(model, tokenizer, eos=eos_ids(model, tokenizer))
    return os.getpid()


def refuse_server_beside_cluster(placement: Placement) -> None:
    """``--serve vllm`` with a running Ray (``--ray-address`` / ``RAY_ADDRESS``) is refused: the server would run
    on the driver's machine, outside Ray's accounting, listening on 127.0.0.1, so cells on that machine could land
    on the GPU where vLLM holds most of the memory and cells on other nodes could not reach it."""
    address = placement.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        raise ValueError(f"--serve vllm with a running Ray ({address}) is not supported: the server would run here, "
                         "outside Ray's accounting of GPUs and reachable only from this machine. Drop --ray-address "
                         "/ unset RAY_ADDRESS (a local Ray: the server's GPUs are kept out of its pool, --jobs N), "
                         "or drop --serve vllm to decode in process on the cluster")


def rerun_on_restarted(server: ServedRun) -> Callable:
    """``scheduler.Resources.retry`` of a served run: a cell that failed while the server died is rerun once, on
    the restarted server (lm-eval's request cache keeps what was answered)."""

    def retry(job, error: BaseException) -> bool:
        return job.kind == "cell" and server.recover()

    return retry


class gpus_left_to_ray:
    """A local Ray started for this run sees the GPUs the server does not take (``serve.split_gpus``)."""

    def __init__(self, server: ServedRun | None, run: Placement):
        self.server, self.run, self.saved = server, run, None

    def __enter__(self):
        if self.server is None or self.run.ray_address or os.environ.get("RAY_ADDRESS"):
            return self
        visible = visible_gpus()
        if visible:
            _, rest = split_gpus(visible, parallel_size(self.server.args))
            self.saved = os.environ.get("CUDA_VISIBLE_DEVICES")
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(rest)
            print(f"== Ray gets GPU(s) {','.join(rest)}; vLLM has {self.server.gpu_env()['CUDA_VISIBLE_DEVICES']}",
                  flush=True)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = self.saved


def worker_device(device: str | None) -> str:
    """The device a job uses where it runs: the GPUs Ray gave it (its ``CUDA_VISIBLE_DEVICES``), else the CPU."""

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def train_job(settings: Settings, method: str, family: str, data: Path, work: Path, device: str | None,
              threads: int | None) -> Path:
    """One adapter training as a job: DDP over every GPU Ray assigned (``accelerate launch --num_processes k``)."""

    device = worker_device(device)
    processes = torch.cuda.device_count() if device == "cuda" else 1
    return train_adapter(settings, method, family, data, work, device == "cuda", threads, max(1, processes))


def cell_job(settings: Settings, method: str, task: str, runs: Path, work: Path, batch_size: int | str,
             device: str | None, endpoint: Endpoint | None = None, adapter: Path | None = None) -> Path:
    """One cell as a job, on the device of the node it landed on; ``endpoint``: the run's vLLM server (its adapter
    registered with it here, by HTTP, once the training job has made it)."""

    served = endpoint.target(settings, method, task, adapter) if endpoint is not None else None
    return score(settings, method, task, runs, work, batch_size, worker_device(device), adapter, served)
