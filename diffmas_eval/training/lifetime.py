"""A child process that dies with its parent: ``PR_SET_PDEATHSIG`` (Linux ``prctl``), through ctypes.

Why: a leaderboard job's trainer is ``accelerate launch`` (torch elastic's agent), whose DDP ranks run in sessions
of their own. A worker killed with SIGKILL (by a person, by the OOM killer) runs no handler, so without this its
launcher and the ranks outlive it, keep writing into the adapter directory that the retry resumes from or removes,
and hold the GPU that Ray gives the retry. The launcher asks for SIGTERM when the worker dies (torch elastic's
agent then stops its ranks), each rank for SIGKILL when the agent dies. Elsewhere than Linux this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits; whether it could. Meant for a child's
    ``preexec_fn`` (``parent``: the starting process's pid, read before the fork) or the first line of its
    ``main``: if the parent is already gone (this process was reparented before the call), the signal is sent at
    once, as the parent's death would have."""
    if not sys.platform.startswith("linux"):
        return False
    before = os.getppid()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != before or (parent is not None and before != parent):  # it died first: nobody would signal
        os.kill(os.getpid(), sig)
    return True
