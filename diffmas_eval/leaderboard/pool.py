"""Cells and adapter trainings N at a time (``diffmas-eval leaderboard --jobs N``).

Each job runs in its own spawned worker process with its own torch threads. On a CPU, N one-thread processes
beat one N-thread process: nothing serial (tokenising, sampling, lm-eval's bookkeeping) leaves cores idle, and
no thread spin-waits on another (measured here, 2 cores: ~2x against one thread, ~1.3x against two).
A trained method's cells wait for their adapter; everything else starts in the order given. A job's output
(lm-eval's, the trainer's, the progress bars) goes to its own log, redirected at the file-descriptor level so
that subprocesses (``accelerate launch``, EvalPlus) land there too; the main process prints one line when a job
starts and when it ends. When a job fails, nothing new starts, the running ones finish (their cells are kept,
a rerun reuses them), and the error names the job and shows the tail of its log.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Job:
    name: str
    fn: Callable  # a module-level function (it is pickled to the worker)
    args: tuple
    log: Path
    after: str | None = None  # the job whose result is passed as the ``adapter`` keyword


def _init(threads: int | None) -> None:
    if threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads)  # the job's own subprocesses
        torch.set_num_threads(threads)


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


def run_jobs(jobs: list[Job], workers: int, threads: int | None = None) -> dict[str, object]:
    """Run ``jobs`` on ``workers`` processes; return each job's result by name."""
    t0 = time.perf_counter()
    names = {j.name for j in jobs}
    missing = [j.after for j in jobs if j.after and j.after not in names]
    if missing:
        raise ValueError(f"jobs wait for unknown job(s) {missing}")
    pending, running, results = list(jobs), {}, {}
    failure: tuple[Job, BaseException] | None = None
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no torch/lm-eval state forked mid-flight
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init, initargs=(threads,)) as pool:
        while pending or running:
            while failure is None and len(running) < workers:
                ready = next((j for j in pending if j.after is None or j.after in results), None)
                if ready is None:
                    break
                pending.remove(ready)
                ready.log.parent.mkdir(parents=True, exist_ok=True)
                kwargs = {"adapter": results[ready.after]} if ready.after else {}
                fut: Future = pool.submit(_logged, ready.fn, ready.args, kwargs, str(ready.log))
                running[fut] = ready
                print(f"[start {len(results) + len(running)}/{len(jobs)}] {ready.name} "
                      f"({time.perf_counter() - t0:.0f} s so far; log {ready.log})", flush=True)
            if not running:
                break  # a failure left jobs pending; or every remaining job waits on one that failed
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                error = fut.exception()
                if error is not None:
                    print(f"[failed] {job.name}: {type(error).__name__}: {error}\n--- {job.log} (last lines)\n"
                          f"{_tail(job.log)}\n---", flush=True)
                    failure = failure or (job, error)
                    continue
                results[job.name] = fut.result()
                print(f"[done {len(results)}/{len(jobs)}] {job.name} ({time.perf_counter() - t0:.0f} s so far)",
                      flush=True)
    if failure is not None:
        job, error = failure
        raise RuntimeError(f"{job.name} failed ({type(error).__name__}: {error}); its log: {job.log}. Finished "
                           f"jobs are kept: {len(results)}/{len(jobs)}; a rerun resumes from them") from error
    return results
