"""The trained methods' adapters, made exactly as users make them.

The SFT set of a family is what ``diffmas-eval sft-data`` writes (the last rows of each source file),
and training is a subprocess ``accelerate launch -m diffmas_eval.training.sft ...`` (what
``trainers/sft.py`` runs), so the leaderboard measures the commands the README documents, from a
checkout or an installed wheel. An adapter directory is named by the hash of its training settings;
it counts as finished only when the adapter files, ``diffmas.json`` and our marker (holding that
hash) are all there. An interrupted training resumes from its last checkpoint (the same settings, by
the directory's name), or restarts cleanly when that checkpoint cannot be read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

from ...commands.options import parse_pairs
from ...training.lifetime import die_with_parent
from ...training.notes import write_notes_set
from ..grid.settings import Settings, short_hash
from ..grid.trainings import ADAPTER_FILES, MARKER, chat_set, finished
from .scheduler import placement

TRAINER = "diffmas_eval.training.sft"  # the module accelerate launches (trainers/sft.py is a thin file over it)


def launch_command(spec: dict, data: Path, out: Path, resume: Path | None, cuda: bool,
                   threads: int | None = None, processes: int = 1) -> list[str]:
    """``accelerate launch -m diffmas_eval.training.sft ...`` for one adapter: the package's trainer, so an
    installed wheel trains as a checkout does (no accelerate config file needed; accelerate is run by this
    interpreter, not looked up on PATH). ``processes`` > 1: DDP, one process per GPU the job was given."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
                "--num_machines", "1", "--dynamo_backend", "no", *(["--multi_gpu"] if processes > 1 else [])]
    # on a CPU, several processes are DDP over gloo through accelerate's torchrun launcher (--multi_gpu), which
    # refuses --cpu beside it: ACCELERATE_USE_CPU (``launch_env``) says CPU instead
    launcher += [] if cuda else [*(["--cpu"] if processes == 1 else []), "--mixed_precision", "no"]
    if threads:
        launcher += ["--num_cpu_threads_per_process", str(threads)]
    steps = spec["steps"]
    # --recipe paper: epochs over the set, accumulation to the effective batch, cosine (config.RECIPES)
    length = ["--max_steps", str(steps)] if steps else ["--num_train_epochs", str(spec["epochs"])]
    cmd = [*launcher, "-m", TRAINER, "--model_name_or_path", spec["model"],
           "--dataset_name", str(data), "--use_peft", "--lora_r", str(spec["lora_r"]),
           "--lora_alpha", str(spec.get("lora_alpha", 2 * spec["lora_r"])), "--agents", str(spec["agents"]),
           "--latent_steps", str(spec["latent_steps"]), *length,
           *(x for k in ("trace", "topology", "stage1_grad", "train_realign") if k in spec
             for x in (f"--{k}", str(spec[k]).lower())),
           "--per_device_train_batch_size", str(spec["batch_size"]),
           "--gradient_accumulation_steps", str(spec.get("accumulation", 1)),
           "--learning_rate", str(spec["learning_rate"]),
           "--lr_scheduler_type", spec.get("lr_scheduler", "constant"), "--optim", "adamw_torch",
           "--max_length", str(spec["max_length"]), "--seed", str(spec["seed"]),
           "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", str(max(1, (steps or 40) // 4)),
           "--save_total_limit", "1", "--report_to", "none", "--output_dir", str(out)]
    if resume is not None:
        cmd += ["--resume_from_checkpoint", str(resume)]
    return cmd


def launch_env(cuda: bool, processes: int) -> dict[str, str] | None:
    """The environment of ``launch_command``'s process: this one's, with ``ACCELERATE_USE_CPU=1`` for DDP on a CPU
    (several gloo processes); None (inherit) otherwise."""
    return {**os.environ, "ACCELERATE_USE_CPU": "1"} if not cuda and processes > 1 else None


def _stream(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Run ``cmd``, showing its output (progress bars included) and keeping it in ``log``."""
    print("$", " ".join(cmd), flush=True)
    with open(log, "ab") as f:
        # it ends with this process, even one killed with SIGKILL: its ranks never outlive a dead worker
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=log.parent, env=env,
                                preexec_fn=partial(die_with_parent, signal.SIGTERM, os.getpid()))
        assert proc.stdout is not None
        while chunk := os.read(proc.stdout.fileno(), 4096):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            f.write(chunk)
        return proc.wait()


def notes_set(settings: Settings, data: Path, work: Path, cuda: bool) -> Path:
    """``data`` with textmas's notes before each prompt (``training/notes.py``), named by what made them."""

    notes = settings.notes()
    digest = short_hash({"data": hashlib.sha256(data.read_bytes()).hexdigest(), "model": settings.model, **notes})
    extra = parse_pairs(settings.textmas_args, "--textmas-args", form="KEY=VALUE")
    model_args = {"pretrained": settings.model, "agents": settings.agents,
                  "agent_max_tokens": settings.agent_max_tokens, "device": "cuda" if cuda else "cpu", **extra}
    out = work / "sft" / f"{data.stem}-notes-{digest}.jsonl"
    print(f"== textmas-sft: the upstream notes for {data.name} ({'cached' if out.exists() else 'writing'} {out})",
          flush=True)
    return write_notes_set(data, out, model_args)


def record_placement(config: Path) -> None:
    """Where the adapter was trained, under the chain file's ``training`` provenance (which loading ignores)."""

    data = json.loads(config.read_text())
    data.setdefault("training", {})["placement"] = placement()
    config.write_text(json.dumps(data, indent=1))


def _last_checkpoint(out: Path) -> Path | None:
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return checkpoints[-1] if checkpoints else None


def train_adapter(settings: Settings, method: str, family: str, data: Path, work: Path, cuda: bool,
            threads: int | None = None, processes: int = 1) -> Path:
    """The finished adapter of ``method`` on ``family`` (trained now unless a finished one is there);
    ``processes`` > 1: DDP over that many GPUs (the same settings, so the same directory: placement is not
    part of an adapter's hash)."""
    spec = settings.training(method, family)
    digest = short_hash(spec)
    out = work / "adapters" / f"{method}-{family}-{digest}"
    if finished(out, digest):
        print(f"== {method} adapter ({family}): reusing {out}", flush=True)
        return out
    if spec.get("sft_format") == "chat":  # the rows as the cells read them: a user turn, the assistant's answer
        data = chat_set(data)
    if method == "textmas-sft":  # the SFT rows with the untrained text agents' notes (cached by their settings)
        data = notes_set(settings, data, work, cuda)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train.log"
    resume = _last_checkpoint(out)
    print(f"== {method} adapter ({family}): training {spec['steps'] or str(spec.get('epochs')) + ' epoch(s)'} steps x "
          f"batch {spec['batch_size']} x accumulation {spec.get('accumulation', 1)} at "
          f"{spec['agents']} agent(s){' (resuming from ' + resume.name + ')' if resume else ''}; log {log}", flush=True)
    # the trainer runs in the adapter's directory (_stream), so every path it is given is absolute
    code = _stream(launch_command(spec, data.resolve(), out.resolve(), resume and resume.resolve(), cuda, threads,
                                  processes),
                   log, launch_env(cuda, processes))
    if code != 0 and resume is not None:  # an unreadable checkpoint (killed mid-save): start over, cleanly
        print(f"resuming from {resume} failed (exit {code}); restarting {method} ({family}) from scratch", flush=True)
        shutil.rmtree(out)
        out.mkdir(parents=True)
        code = _stream(launch_command(spec, data.resolve(), out.resolve(), None, cuda, threads, processes), log,
                       launch_env(cuda, processes))
    if code != 0:
        raise RuntimeError(f"training {method} ({family}) failed (exit {code}); see {log}")
    missing = [f for f in ADAPTER_FILES if not (out / f).exists()]
    if missing:
        raise RuntimeError(f"training {method} ({family}) finished without {', '.join(missing)} in {out}")
    for checkpoint in out.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    record_placement(out / "diffmas.json")
    record = json.loads((out / "diffmas.json").read_text()).get("training", {})
    loss = {k: record[f"loss_{k}"] for k in ("first", "last", "steps") if f"loss_{k}" in record}
    if loss:
        print(f"== {method} adapter ({family}): loss {loss['first']:.4f} -> {loss['last']:.4f} over {loss['steps']} "
              f"logged steps (curve: {out / 'loss.csv'})", flush=True)
    (out / MARKER).write_text(json.dumps({"hash": digest, "training": spec, "data": str(data), "loss": loss},
                                         indent=1) + "\n")
    return out
