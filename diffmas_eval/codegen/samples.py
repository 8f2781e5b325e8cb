"""The samples of a run: EvalPlus's ``samples.jsonl`` (``task_id``, ``solution``), its ``.raw.jsonl``
twin (the model's output before ``evalplus.sanitize``, as ``evalplus.codegen`` keeps it), the
per-sample accounting, and ``codegen.json`` (the configuration the samples were made with).

Every batch is appended and flushed as soon as it is generated, so an interruption loses at most one
batch, and a rerun only generates what is missing. A directory holding samples of another
configuration is refused, never appended to or overwritten.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

CONFIG_FILE = "codegen.json"
SAMPLES_FILE = "samples.jsonl"
RAW_FILE = "samples.raw.jsonl"
ACCOUNTING_FILE = "accounting.jsonl"


class SampleDir:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.samples = self.dir / SAMPLES_FILE
        self.raw = self.dir / RAW_FILE
        self.accounting = self.dir / ACCOUNTING_FILE
        self.config_path = self.dir / CONFIG_FILE

    def check_config(self, config: dict) -> None:
        """Refuse a directory whose samples were made with another configuration (naming what differs)."""
        if self.config_path.exists():
            old = json.loads(self.config_path.read_text())
            diff = {k for k in old.keys() | config.keys() if old.get(k) != config.get(k)}
            if diff:
                details = "; ".join(f"{k}: {old.get(k)!r} there, {config.get(k)!r} now" for k in sorted(diff))
                raise ValueError(f"{self.dir} holds samples of a different configuration ({details}); "
                                 "choose another --out or --name, or remove that directory")
        elif self.samples.exists():
            raise ValueError(f"{self.samples} exists but has no {CONFIG_FILE}: not written by diffmas-eval codegen; "
                             "choose another --out or --name")

    def open(self, config: dict) -> None:
        self.check_config(config)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.config_path.exists():
            self.config_path.write_text(json.dumps(config, indent=1) + "\n")

    def counts(self) -> Counter:
        """Samples written so far, per task (a truncated last line, from a kill mid-write, is dropped)."""
        counts: Counter = Counter()
        if self.samples.exists():
            for line in self.samples.read_text().splitlines():
                try:
                    counts[json.loads(line)["task_id"]] += 1
                except (json.JSONDecodeError, KeyError):
                    continue
        return counts

    def write(self, rows: list[dict]) -> None:
        """Append one batch: ``{task_id, solution, raw, accounting}`` per sample."""
        self._repair()
        with self.samples.open("a") as s, self.raw.open("a") as r, self.accounting.open("a") as a:
            for row in rows:
                r.write(json.dumps({"task_id": row["task_id"], "solution": row["raw"]}) + "\n")
                a.write(json.dumps({"task_id": row["task_id"], **row["accounting"]}) + "\n")
            for row in rows:  # samples last: a task counts as done only once its side records are in
                s.write(json.dumps({"task_id": row["task_id"], "solution": row["solution"]}) + "\n")
            for f in (r, a, s):
                f.flush()

    def _repair(self) -> None:
        """Cut a truncated last line (a kill mid-write) so that appending keeps the file valid JSONL."""
        for path in (self.samples, self.raw, self.accounting):
            if path.exists() and path.stat().st_size:
                text = path.read_text()
                if not text.endswith("\n"):
                    path.write_text(text[: text.rfind("\n") + 1])

    def accounting_records(self) -> list[dict]:
        if not self.accounting.exists():
            return []
        return [json.loads(line) for line in self.accounting.read_text().splitlines() if line.strip()]


def summarise_accounting(records: list[dict]) -> dict:
    """Mean generated tokens per agent and per sample, and seconds per sample, over all samples."""
    if not records:
        return {"samples": 0}
    per_agent: dict[str, list[int]] = {}
    for r in records:
        for agent in r["agents"]:
            per_agent.setdefault(agent["role"], []).append(agent.get("tokens") or 0)
    n = len(records)
    return {"samples": n,
            "tokens_per_sample": round(sum(r["tokens"] for r in records) / n, 2),
            "tokens_per_agent": {k: round(sum(v) / len(v), 2) for k, v in per_agent.items()},
            "seconds_per_sample": round(sum(r["seconds"] for r in records) / n, 4),
            "seconds_total": round(sum(r["seconds"] for r in records), 2)}
