"""Where a run's jobs go: the flags ``diffmas-eval leaderboard`` and ``diffmas-eval ablate`` share (one definition,
so the two front ends cannot drift), the options they fill, and the ``scheduler.Resources`` those become.

Nothing here changes a number: placement never enters a cell's or an adapter's hash."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .scheduler import Resources

if TYPE_CHECKING:
    from .scheduler import Resources

GIB = 1024**3


@dataclass
class Placement:
    """How many jobs at once, with how many CPU threads and GPUs each, on which Ray; ``gpu_memory``: GiB of the
    cluster's largest GPU when the nodes cannot say (declared GPUs, ``ray start --num-gpus``; default: asked from
    each node's torch); ``plan``: print the jobs and their estimates, then stop."""

    jobs: int | None = None
    threads: int | None = None
    ray_address: str | None = None
    gpus_per_cell: float | None = None
    gpus_per_training: int | None = None
    gpu_memory: float | None = None
    plan: bool = False


FIELDS = tuple(Placement.__dataclass_fields__)


def add_placement_flags(p: argparse.ArgumentParser) -> None:
    """``--jobs``, ``--threads`` and the placement group (``--ray-address``, ``--gpus-per-cell``,
    ``--gpus-per-training``, ``--gpu-memory``, ``--plan``)."""
    d = Placement()
    p.add_argument("--threads", type=int, default=d.threads,
                   help="CPU threads for torch here and in each job (default: torch's). On a CPU shared with other "
                        "jobs, 1 avoids threads spin-waiting on each other (many times faster there)")
    p.add_argument("--jobs", type=int, default=d.jobs,
                   help="at most N cells and trainings at once, each a Ray task with --threads CPUs (default: one "
                        "at a time in this process on a machine without GPUs; with GPUs or a cluster, as many as "
                        "the resources allow). On a CPU, --jobs CORES --threads 1 is the fastest; each job logs to "
                        "WORK_DIR/logs/")
    g = p.add_argument_group("placement (Ray: every GPU of a node, or a cluster; docs/leaderboard.md, Scaling out)")
    g.add_argument("--ray-address", default=d.ray_address, metavar="HOST:PORT",
                   help="a running Ray cluster (default $RAY_ADDRESS; neither: a local Ray with this machine's CPUs "
                        "and GPUs, shut down at the end)")
    g.add_argument("--gpus-per-cell", type=float, default=d.gpus_per_cell, metavar="K",
                   help="GPUs each cell asks for (default 1 where the cluster has GPUs, else 0; 0.5: two cells share "
                        "a GPU; 2 or more: the model spread over them)")
    g.add_argument("--gpus-per-training", type=int, default=d.gpus_per_training, metavar="K",
                   help="GPUs each adapter training asks for (default 1 where the cluster has GPUs, else 0; K > 1: "
                        "DDP, accelerate launch --num_processes K)")
    g.add_argument("--gpu-memory", type=float, default=d.gpu_memory, metavar="GIB",
                   help="memory of the cluster's largest GPU, for the fit check and --plan, when the nodes cannot "
                        "tell (GPUs declared with ray start --num-gpus) or to plan for a smaller GPU (default: asked "
                        "from each node)")
    g.add_argument("--plan", action="store_true",
                   help="print every training and cell to run with the GPUs and CPUs it asks, its estimated peak "
                        "accelerator memory and (from an earlier run's cells) its GPU-hours, then stop; a job no "
                        "GPU of the cluster can hold is refused")


def placement_of(args: argparse.Namespace) -> dict:
    """The placement flags' values, by ``Placement`` field name."""
    return {name: getattr(args, name) for name in FIELDS}


def resources_of(opts: Placement, output: Path, work: Path) -> Resources:
    """The scheduler's view of ``opts``; the store is the directory holding the output and the work directory."""

    if opts.jobs is not None and opts.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {opts.jobs}")
    if opts.gpu_memory is not None and opts.gpu_memory <= 0:
        raise ValueError(f"--gpu-memory must be > 0 GiB, got {opts.gpu_memory:g}")
    return Resources(address=opts.ray_address, jobs=opts.jobs, threads=opts.threads,
                     gpus_per_cell=opts.gpus_per_cell, gpus_per_training=opts.gpus_per_training,
                     store=store_of(output, work),
                     gpu_memory=None if opts.gpu_memory is None else int(opts.gpu_memory * GIB))


def store_of(output: Path, work: Path) -> tuple[Path, ...]:
    """The directories every node must see: the output's and the work directory (each checked by a nonce written
    there: a parent they share may be ``/``, and a node's own ``/scratch`` is not the driver's)."""
    return tuple(dict.fromkeys((output.parent.resolve(), work.resolve())))
