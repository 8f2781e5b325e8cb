"""Paired comparisons of leaderboard methods: per task, the difference of two methods over the items both scored.

Every method of a leaderboard scores the same first items of a task, so a difference is measured item by item
(``stats.paired_bootstrap``) rather than judged from two per-method stderrs: the items' own difficulty, shared by
both methods, drops out of the noise. The pairs are each method against ``single`` (what a multi-agent system or
training adds to the plain model), ``diffmas`` against ``latentmas`` (training the chain) and ``single-sft`` (the
chain against training one agent the same way), and each trained on-request method against its untrained or text
twin (``TWINS``). Computed from the per-item scores alone (``leaderboard_items.csv``), so ``comparisons.csv`` and
the tables can be regenerated from committed files.

With many pairs some intervals exclude 0 by chance (about 1 in 20 at 95% when nothing differs), so each row also
says whether its difference survives a Bonferroni correction over every comparison of the model (the interval at
1 - 0.05/m excludes 0).
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..grid.settings import METHODS
from .stats import BOOTSTRAP, paired_bootstrap

REFERENCE = "single"
# method -> the methods it is compared with besides ``single``: its untrained or text twin, and for diffmas the
# single agent trained the same way
TWINS = {"diffmas": ("latentmas", "single-sft"), "diffmas-hier": ("latentmas-hier",), "stitchmas": ("latentmas",),
         "textmas-sft": ("textmas",)}
FILE = "comparisons.csv"
FIELDS = ["model", "task", "metric", "method", "reference", "items", "method_score", "reference_score", "delta",
          "ci_low", "ci_high", "beyond_noise", "comparisons", "bonferroni_low", "bonferroni_high",
          "beyond_noise_bonferroni", "config_hash", "reference_config_hash"]
CORRECTED_RESAMPLES = 10 * BOOTSTRAP  # the corrected interval reaches further into the tails


def pairs(methods: list[str]) -> list[tuple[str, str]]:
    """(method, reference) for the methods present, in the leaderboard's method order."""
    present = sorted(set(methods), key=lambda m: (METHODS.index(m) if m in METHODS else len(METHODS), m))
    out = [(m, REFERENCE) for m in present if m != REFERENCE and REFERENCE in present]
    out += [(m, twin) for m in present for twin in TWINS.get(m, ()) if twin in present]
    return list(dict.fromkeys(out))


def _cells(item_rows: list[dict]) -> dict[tuple[str, str, str, str], tuple[str, dict[str, float]]]:
    """(model, method, task, metric) -> (config hash, doc id -> score)."""
    cells: dict[tuple[str, str, str, str], tuple[str, dict[str, float]]] = {}
    for r in item_rows:
        key = (r["model"], r["method"], r["task"], r["metric"])
        digest, scores = cells.setdefault(key, (str(r.get("config_hash", "")), {}))
        if str(r.get("config_hash", "")) != digest:
            raise ValueError(f"{r['method']} x {r['task']} ({r['model']}): per-item scores of two cells (config hashes "
                             f"{digest} and {r.get('config_hash')}); keep one of them")
        scores[str(r["doc_id"])] = float(r["score"])
    return cells


def _same_items(method: tuple, reference: tuple, a: tuple[str, dict], b: tuple[str, dict]) -> None:
    """Refuse a comparison of cells scored on different items, naming both cells and the items that differ."""
    only_a, only_b = sorted(set(a[1]) - set(b[1])), sorted(set(b[1]) - set(a[1]))
    if only_a or only_b:
        model, name, task, metric = method

        def some(xs: list[str]) -> str:
            return ", ".join(xs[:8]) + (f" and {len(xs) - 8} more" if len(xs) > 8 else "") if xs else "none"

        raise ValueError(
            f"{task} ({metric}, {model}): {name} (cell {a[0]}, {len(a[1])} items) and {reference[1]} (cell {b[0]}, "
            f"{len(b[1])} items) were scored on different items, so they cannot be compared item by item; only "
            f"{name}: {some(only_a)}; only {reference[1]}: {some(only_b)}. Score both on the same items (the same "
            "--limit) and collect again")


def comparisons(item_rows: list[dict], resamples: int = BOOTSTRAP) -> list[dict]:
    """One row per pair x task x metric present in ``item_rows`` (``leaderboard_items.csv``'s rows)."""
    cells = _cells(item_rows)
    found = []
    for model in sorted({k[0] for k in cells}):
        for task, metric in sorted({(k[2], k[3]) for k in cells if k[0] == model}):
            methods = [k[1] for k in cells if k[0] == model and k[2] == task and k[3] == metric]
            for method, reference in pairs(methods):
                a_key, b_key = (model, method, task, metric), (model, reference, task, metric)
                _same_items(a_key, b_key, cells[a_key], cells[b_key])
                found.append((a_key, b_key))
    out = []
    for model in sorted({a[0] for a, _ in found}):
        mine = [(a, b) for a, b in found if a[0] == model]
        m = len(mine)
        for a_key, b_key in mine:
            (ha, a), (hb, b) = cells[a_key], cells[b_key]
            delta, lo, hi, n = paired_bootstrap(a, b, resamples)
            _, blo, bhi, _ = paired_bootstrap(a, b, max(resamples, CORRECTED_RESAMPLES), level=1 - 0.05 / m)
            out.append({"model": model, "task": a_key[2], "metric": a_key[3], "method": a_key[1],
                        "reference": b_key[1], "items": n, "method_score": round(sum(a.values()) / len(a), 4),
                        "reference_score": round(sum(b.values()) / len(b), 4), "delta": round(delta, 4),
                        "ci_low": round(lo, 4), "ci_high": round(hi, 4), "beyond_noise": lo > 0 or hi < 0,
                        "comparisons": m, "bonferroni_low": round(blo, 4), "bonferroni_high": round(bhi, 4),
                        "beyond_noise_bonferroni": blo > 0 or bhi < 0, "config_hash": ha,
                        "reference_config_hash": hb})
    return out


def write(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def read_items(directory: Path) -> list[dict]:
    """``leaderboard_items.csv`` beside the leaderboard's CSV (no rows when it is not there)."""
    path = Path(directory) / "leaderboard_items.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _true(x) -> bool:
    return x is True or str(x) == "True"


def table(rows: list[dict]) -> str:
    """The comparisons as Markdown (empty without any): Δ and its interval, marked where beyond noise."""
    if not rows:
        return ""
    lines = ["| task | metric | method | vs | items | Δ | 95% CI | beyond noise |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = ("yes, Bonferroni too" if _true(r["beyond_noise_bonferroni"]) else "yes"
                if _true(r["beyond_noise"]) else "")
        lines.append(f"| {r['task']} | {r['metric']} | {r['method']} | {r['reference']} | {r['items']} | "
                     f"{float(r['delta']):+.2f} | [{float(r['ci_low']):+.2f}, {float(r['ci_high']):+.2f}] | {mark} |")
    m = ", ".join(sorted({str(r["comparisons"]) for r in rows}))
    return ("Paired comparisons (per task, the mean per-item difference method - vs over the items both scored, with "
            f"a {BOOTSTRAP}-resample paired bootstrap 95% interval; `comparisons.csv`). Beyond noise: the interval "
            f"excludes 0. These are {m} comparisons, so about 1 in 20 of the true nulls among them lands beyond noise "
            "by chance; \"Bonferroni too\" marks those whose interval at 1 - 0.05/" + m + " excludes 0 as well:\n\n"
            + "\n".join(lines))


def beyond_noise(rows: list[dict]) -> list[str]:
    """The comparisons whose interval excludes 0, as short phrases."""
    return [f"{r['task']}: {r['method']} {float(r['delta']):+.2f} vs {r['reference']} "
            f"[{float(r['ci_low']):+.2f}, {float(r['ci_high']):+.2f}]"
            + (" (Bonferroni too)" if _true(r["beyond_noise_bonferroni"]) else "")
            for r in rows if _true(r["beyond_noise"])]
