"""Which EvalPlus dataset file a run reads, and the subset file of a ``--limit`` run.

EvalPlus reads ``HUMANEVAL_OVERRIDE_PATH`` / ``MBPP_OVERRIDE_PATH`` once, at import, and then ignores
``--mini``/``--noextreme`` (the override path is returned as is, and the ground-truth cache in
``~/.cache/evalplus`` is keyed by the md5 of that file). Its evaluator also insists on a sample for every
task of the file. So a run pins one file: the override (``$DIFFMAS_DATA_DIR`` sets it, offline), or
EvalPlus's own release file (downloaded into its cache, online); a ``--limit N`` run writes the first N
tasks of it, byte for byte, next to the samples, and the evaluator is pointed at that file.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..extras import require

DATASETS = {
    # name: (override variable, file under $DIFFMAS_DATA_DIR, EvalPlus release name)
    "humaneval": ("HUMANEVAL_OVERRIDE_PATH", "humanevalplus/HumanEvalPlus.jsonl.gz", "HumanEvalPlus"),
    "mbpp": ("MBPP_OVERRIDE_PATH", "mbppplus/MbppPlus.jsonl", "MbppPlus"),
}


def configure_offline(environ: dict | None = None) -> None:
    """With ``$DIFFMAS_DATA_DIR`` set, point EvalPlus at the local files (unless already overridden).

    Call before anything imports ``evalplus``: it reads the variables at import."""
    environ = os.environ if environ is None else environ
    root = environ.get("DIFFMAS_DATA_DIR")
    if not root:
        return
    for var, rel, _ in DATASETS.values():
        if not environ.get(var) and (Path(root) / rel).exists():
            environ[var] = str(Path(root) / rel)


@dataclass
class Dataset:
    name: str
    path: Path  # the file EvalPlus reads
    overridden: bool  # read through the override variable (else EvalPlus's own default file)
    lines: list[str]  # the raw JSON lines, in file order

    @property
    def variable(self) -> str:
        return DATASETS[self.name][0]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def tasks(self) -> list[dict]:
        return [json.loads(line) for line in self.lines]

    def subset(self, limit: int | None, directory: Path) -> Dataset:
        """The first ``limit`` tasks as their own file in ``directory`` (the whole dataset if no limit)."""
        if limit is None or limit == len(self.lines):
            return self
        if limit < 1 or limit > len(self.lines):
            raise ValueError(f"--limit {limit} is out of range: {self.name} ({self.path}) has "
                             f"{len(self.lines)} tasks; use 1..{len(self.lines)} or drop --limit")
        path = directory / f"{self.name}-first{limit}.jsonl"
        text = "".join(line + "\n" for line in self.lines[:limit])
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        return Dataset(self.name, path, True, self.lines[:limit])


def load_dataset(name: str) -> Dataset:
    """The dataset file EvalPlus would read for ``name`` right now (downloaded into its cache if online)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    var, _, release = DATASETS[name]
    if os.environ.get(var):
        path, overridden = Path(os.environ[var]), True
        if not path.exists():
            raise ValueError(f"{var}={path} does not exist; unset it or point it at an EvalPlus {release} file")
    else:
        require("evalplus")
        from evalplus.data.humaneval import HUMANEVAL_PLUS_VERSION  # optional extra: codegen
        from evalplus.data.mbpp import MBPP_PLUS_VERSION  # optional extra: codegen
        from evalplus.data.utils import get_dataset_metadata, make_cache  # optional extra: codegen

        version = HUMANEVAL_PLUS_VERSION if name == "humaneval" else MBPP_PLUS_VERSION
        url, cache = get_dataset_metadata(release, version, False, False)
        make_cache(url, cache)
        path, overridden = Path(cache), False
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    return Dataset(name, path, overridden, lines)


def task_prompt(task: dict) -> str:
    """The code prompt EvalPlus's codegen sends (``task["prompt"].strip() + "\\n"``).

    The MBPP+ pre-release files (e.g. 2023-11-16) keep the example test in a separate ``assertion``
    field; the v0.2.0 release puts its first line into the prompt's docstring, which is the only place
    the function's name appears. Do the same here, so both files give the same kind of prompt."""
    prompt = task["prompt"].strip()
    assertion = next((a for a in str(task.get("assertion", "")).splitlines() if a.strip()), "")
    if assertion and "assert" not in prompt:
        for quote in ('"""', "'''"):
            if prompt.endswith(quote):
                prompt = f"{prompt[:-3].rstrip()}\n{assertion.strip()}\n{quote}"
                break
    return prompt + "\n"
