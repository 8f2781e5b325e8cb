"""What the leaderboard shows: the tidy CSV, the Markdown table, the charts and README.md's results section.

Everything here is a function of the CSV's rows, so ``--readme`` regenerates the README section from a
CSV made anywhere, and running it twice changes nothing.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..extras import require
from ..readme import end_marker, replace_section, start_marker
from .collect import FIELDS
from .config import LAYOUT, METHODS, TEXT_METHODS, primary_metric

DOCS_PAGE = "docs/leaderboard.md"  # the full section; README.md carries the short "headline" one
README_COMMAND = f"diffmas-eval leaderboard --readme {DOCS_PAGE}"
HEADLINE_COMMAND = "diffmas-eval leaderboard --readme README.md"
README_START, README_END = start_marker("leaderboard", README_COMMAND), end_marker("leaderboard")
HEADLINE_START, HEADLINE_END = start_marker("headline", HEADLINE_COMMAND), end_marker("headline")
CHARTS = ("accuracy.png", "accuracy_vs_tokens.png")
STABILITY_CHARTS = ("entropy_curve.png", "perplexity_vs_accuracy.png")  # drawn when the results carry stability
CURVE_FIELDS = ["method", "task", "position", "entropy", "n"]
ITEM_FIELDS = ["model", "method", "task", "metric", "doc_id", "score", "config_hash"]


def _write_atomically(rows: list[dict], path: Path, fields: list[str]) -> None:
    """``rows`` as a CSV at ``path``, through a temporary file: an interrupted write leaves the old file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def write_csv(rows: list[dict], path: Path) -> None:
    _write_atomically(sorted(rows, key=_order), path, FIELDS)


def write_curves(rows: list[dict], path: Path) -> None:
    """entropy_curve.csv: mean token entropy at each answer position, per method and task (and how many answers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (_order({**r, "metric": ""}), int(r["position"]))))


def write_items(rows: list[dict], path: Path) -> None:
    """leaderboard_items.csv: each cell's score on each item (``collect.items``), in the table's order."""
    _write_atomically(sorted(rows, key=lambda r: (_order(r), r["model"], _doc_order(str(r["doc_id"])))), path,
                      ITEM_FIELDS)


def _doc_order(doc_id: str) -> tuple:
    """lm-eval's doc ids are integers, EvalPlus's ``HumanEval/12``: numeric order within either."""
    head, _, tail = doc_id.rpartition("/")
    return (head, int(tail)) if tail.isdigit() else (head, -1, tail)


def read_csv(path: Path, command: str = "diffmas-eval leaderboard") -> list[dict]:
    """The rows of a CSV that ``command`` writes (the error says to run it)."""
    if not path.exists():
        raise ValueError(f"{path} does not exist; run `{command}` first (or pass --output)")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _order(row: dict) -> tuple:
    method = row["method"]
    return (METHODS.index(method) if method in METHODS else len(METHODS), method, row["task"], row["metric"])


def _float(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def primary(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """(method, task) -> the row of the task's headline metric."""
    return {(r["method"], r["task"]): r for r in rows if r["metric"] == primary_metric(r["task"])}


def methods_and_tasks(rows: list[dict]) -> tuple[list[str], list[str]]:
    methods = sorted({r["method"] for r in rows}, key=lambda m: _order({"method": m, "task": "", "metric": ""}))
    tasks = list(dict.fromkeys(r["task"] for r in sorted(rows, key=lambda r: r["task"])))
    return methods, tasks


def budgets(rows: list[dict]) -> str:
    """One line per method: what it spends (agents, latent steps, text budgets) and the shared settings."""
    lines = []
    by_method: dict[str, dict] = {}
    for r in rows:
        by_method.setdefault(r["method"], r)
    for method in methods_and_tasks(rows)[0]:
        r = by_method[method]
        parts = [f"agents={r['agents'] or 1}"]
        if method in LAYOUT:
            parts.append(f"latent_steps={r['latent_steps']}")
            parts += [f"{k}={v}" for k, v in LAYOUT[method].items()]
        if method in TEXT_METHODS:
            parts.append(f"agent_max_tokens={r['agent_max_tokens']} per upstream agent")
        parts.append(f"max_gen_toks={r['max_gen_toks']}")
        adapters = sorted({Path(x["adapter"]).name for x in rows if x["method"] == method and x.get("adapter")})
        if adapters:
            parts.append("LoRA adapters " + ", ".join(f"`{a}`" for a in adapters))
        lines.append(f"- `{method}`: " + ", ".join(parts))
    models = sorted({r["model"] for r in rows})
    ns = sorted({int(float(r["n"])) for r in primary(rows).values() if _float(r["n"]) is not None})
    head = (f"Model {', '.join(f'`{m}`' for m in models)}; items per task: {', '.join(map(str, ns))} (the first ones; "
            f"trained methods never saw them). Value ± stderr (lm-eval's, sqrt(p(1-p)/(n-1)) for a mean); "
            "metric per task: acc (multiple choice), exact_match (generative), pass@1 on base + plus tests "
            "(HumanEval+).")
    return head + "\n\n" + "\n".join(lines)


def _mean(xs: list[float], fmt: str) -> str:
    return format(sum(xs) / len(xs), fmt) if xs else ""


def markdown(rows: list[dict]) -> str:
    """Methods as rows, tasks as columns (headline metric, value ± stderr), then tokens and seconds per sample."""
    cells = primary(rows)
    methods, tasks = methods_and_tasks(rows)
    tasks = [t for t in tasks if any((m, t) in cells for m in methods)]
    columns = " | ".join(f"{t} ({primary_metric(t)})" for t in tasks)
    header = f"| method | {columns} | tokens / sample | s / sample |"
    lines = [header, "|---" * (len(tasks) + 3) + "|"]
    for m in methods:
        vals, toks, secs = [], [], []
        for t in tasks:
            r = cells.get((m, t))
            if r is None:
                vals.append("")
                continue
            se = _float(r["stderr"])
            vals.append(f"{float(r['value']):.2f} ± {se:.2f}" if se is not None else f"{float(r['value']):.2f}")
            if _float(r["tokens_per_sample"]) is not None:
                toks.append(float(r["tokens_per_sample"]))
            if _float(r["seconds_per_sample"]) is not None:
                secs.append(float(r["seconds_per_sample"]))
        lines.append(f"| {m} | " + " | ".join(vals) + f" | {_mean(toks, '.0f')} | {_mean(secs, '.1f')} |")
    return "\n".join(lines)


def beyond_noise(rows: list[dict], skip: set[str] | frozenset = frozenset()) -> list[str]:
    """Pairs of methods whose headline scores on a task differ by more than twice their combined stderr (the rule
    for tasks without per-item scores; ``skip``: the tasks compared item by item instead)."""
    cells = primary(rows)
    methods, tasks = methods_and_tasks(rows)
    found = []
    for t in tasks:
        if t in skip:
            continue
        for i, a in enumerate(methods):
            for b in methods[i + 1:]:
                ra, rb = cells.get((a, t)), cells.get((b, t))
                if ra is None or rb is None:
                    continue
                diff = float(rb["value"]) - float(ra["value"])
                bound = 2 * ((_float(ra["stderr"]) or 0) ** 2 + (_float(rb["stderr"]) or 0) ** 2) ** 0.5
                if abs(diff) > bound:
                    found.append(f"{t}: {b} {'+' if diff > 0 else '-'}{abs(diff):.2f} vs {a} (2 x stderr: {bound:.2f})")
    return found


def stability_table(rows: list[dict]) -> str:
    """Decoding stability per method: answer perplexity, mean entropy and the share of answers that ran into
    the cap, each the mean over the method's generative tasks (per task in the CSV); empty without them."""
    methods, _ = methods_and_tasks(rows)
    lines = []
    for m in methods:
        vals = []
        for metric, fmt in (("answer_perplexity", ".2f"), ("answer_entropy", ".3f"), ("answer_capped", ".2f")):
            xs = [float(r["value"]) for r in rows if r["method"] == m and r["metric"] == metric
                  and _float(r["value"]) is not None]
            vals.append(_mean(xs, fmt))
        if any(vals):
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
    if not lines:
        return ""
    return ("Decoding stability (the paper's: perplexity of the generated answer under the model that wrote it, "
            "mean token entropy in nats; mean over the generative tasks):\n\n"
            "| method | answer perplexity | answer entropy | share capped |\n|---|---|---|---|\n" + "\n".join(lines))


def noise(rows: list[dict], comparison_rows: list[dict] | None, short: bool = False) -> str:
    """What differs beyond noise: paired (``compare``: the interval excludes 0) where the tasks have per-item
    scores, else the stderr rule, each labelled."""
    from . import compare

    paired_tasks = {r["task"] for r in comparison_rows or []}
    unpaired = beyond_noise(rows, paired_tasks)
    text = ""
    if paired_tasks:
        found = compare.beyond_noise(comparison_rows or [])
        text = ("Differences beyond noise, paired (the 95% interval excludes 0; "
                f"{', '.join(sorted(paired_tasks))}): " + ("; ".join(found) if found else "none at this n") + ".")
    if set(methods_and_tasks(rows)[1]) - paired_tasks:
        rule = "" if short else " (more than 2 x sqrt(stderr_a^2 + stderr_b^2))"
        label = "Differences beyond noise" + (", unpaired, on the tasks without per-item scores" if paired_tasks
                                             else "")
        text += (" " if text else "") + (f"{label}{rule}: " + ("; ".join(unpaired) if unpaired else "none at this n")
                                         + ".")
    return text


def document(rows: list[dict], charts_dir: str | None = None, comparison_rows: list[dict] | None = None) -> str:
    """leaderboard.md (and README's section): the budgets, the table, the paired comparisons, the charts."""
    from . import compare

    text = budgets(rows) + "\n\n" + markdown(rows) + "\n\n" + (
        "Tokens per sample: generated tokens, every agent's (DiffMAS's upstream agents generate none; they take "
        "latent steps), averaged over the tasks; seconds per sample: wall time of a batch / its samples (for "
        "`single`/`single-sft`, the task's wall time / items, model loading included). All metrics (acc_norm, "
        "HumanEval base tests) are in `leaderboard.csv`.")
    stab = stability_table(rows)
    if stab:
        text += "\n\n" + stab
    paired = compare.table(comparison_rows or [])
    if paired:
        text += "\n\n" + paired
    text += "\n\n" + noise(rows, comparison_rows)
    if charts_dir is not None:
        shown = CHARTS + (STABILITY_CHARTS if stab else ())
        text += "\n\n" + "\n".join(f"![{c[:-4]}]({charts_dir}{c})" for c in shown)
    return text + "\n"


def _save(fig, ax, path: Path, grid: str = "both", **legend) -> Path:
    """Every chart's last steps in one place (legend, light grid, tight layout, 110 dpi), so the charts match."""
    import matplotlib.pyplot as plt

    ax.legend(**legend)
    ax.grid(axis=grid, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def charts(rows: list[dict], out: Path) -> list[Path]:
    """Accuracy per task and method (error bars: stderr); accuracy against tokens per sample."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = primary(rows)
    methods, tasks = methods_and_tasks(rows)
    tasks = [t for t in tasks if any((m, t) in cells for m in methods)]
    colors = plt.get_cmap("tab10")
    out.mkdir(parents=True, exist_ok=True)
    models = ", ".join(sorted({r["model"] for r in rows}))
    ns = sorted({str(r["n"]) for r in cells.values()}, key=lambda n: float(n or 0))  # items, not answers

    fig, ax = plt.subplots(figsize=(max(7.0, 1.5 * len(tasks) + 2), 5.2))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        xs, ys, es = [], [], []
        for j, t in enumerate(tasks):
            r = cells.get((m, t))
            if r is not None:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(float(r["value"]))
                es.append(_float(r["stderr"]) or 0.0)
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=m, color=colors(i), error_kw={"elinewidth": 0.8,
                                                                                      "alpha": 0.6})
        for x, y, e in zip(xs, ys, es):  # the value above each bar and its error bar: a 0 is a result, not a gap
            ax.text(x, y + e + 0.01, f"{y:.2f}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([f"{t.removeprefix('diffmas_')}\n({primary_metric(t)})" for t in tasks], fontsize=8)
    ax.set_ylabel("score (error bar: ± stderr)")
    ax.set_ylim(0, 1.1)
    ax.set_title(f"{models}: score per task (n = {', '.join(ns)} items per task)", fontsize=10)
    paths = [_save(fig, ax, out / CHARTS[0], "y", ncol=len(methods), fontsize=8, loc="upper center",
                   bbox_to_anchor=(0.5, -0.14), frameon=False)]

    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    for i, m in enumerate(methods):
        pts = [(_float(r["tokens_per_sample"]), float(r["value"]), _float(r["stderr"]) or 0.0)
               for t in tasks if (r := cells.get((m, t))) is not None and _float(r["tokens_per_sample"]) is not None]
        if not pts:
            continue
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=colors(i), alpha=0.3, s=18)
        tok, val = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
        err = sum(p[2] ** 2 for p in pts) ** 0.5 / len(pts)
        ax.errorbar(tok, val, yerr=err, fmt="o", color=colors(i), markersize=8, capsize=3, label=m)
        ax.annotate(m, (tok, val), textcoords="offset points", xytext=(8, 14 - 8 * i), fontsize=8, color=colors(i))
    ax.set_xlabel("generated tokens per sample (all agents; mean over tasks)")
    ax.set_ylabel("score (mean over tasks ± stderr)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"{models}: score against tokens per sample\n(large: mean over the {len(tasks)} tasks; "
                 "small: one task)", fontsize=10)
    paths.append(_save(fig, ax, out / CHARTS[1], fontsize=8, loc="upper right"))
    return paths + stability_charts(rows, out, models)


def stability_charts(rows: list[dict], out: Path, models: str) -> list[Path]:
    """Entropy along the answer (mean curve per method, over its generative tasks; from entropy_curve.csv)
    and answer perplexity against the headline score (one point per method x generative task)."""
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10")
    methods, _ = methods_and_tasks(rows)
    paths = []
    curve_file = out / "entropy_curve.csv"
    curves = read_csv(curve_file) if curve_file.exists() else []
    if curves:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for i, m in enumerate(methods):
            pts: dict[int, list[tuple[float, int]]] = {}
            for r in curves:
                if r["method"] == m:
                    pts.setdefault(int(r["position"]), []).append((float(r["entropy"]), int(r["n"])))
            if not pts:
                continue
            xs = sorted(pts)
            ys = [sum(e * n for e, n in pts[x]) / sum(n for _, n in pts[x]) for x in xs]  # weighted by answers
            ax.plot(xs, ys, color=colors(i), label=m, linewidth=1.6)
        ax.set_xlabel("answer position (token)")
        ax.set_ylabel("mean token entropy (nats)")
        ax.set_title(f"{models}\nentropy along the answer (mean over the answers that reach each position)",
                     fontsize=10)
        paths.append(_save(fig, ax, out / STABILITY_CHARTS[0], fontsize=8))
    ppl = {(r["method"], r["task"]): r for r in rows if r["metric"] == "answer_perplexity"}
    cells = primary(rows)
    if ppl:
        from matplotlib.lines import Line2D

        fig, ax = plt.subplots(figsize=(7.5, 5.0))
        # colour = method, marker = task (text labels pile up where many cells score 0)
        shown = [t for t in methods_and_tasks(rows)[1] if any(tt == t for _, tt in ppl)]
        marker = dict(zip(shown, "osD^vPX*<>h"))
        for i, m in enumerate(methods):
            for (mm, t), p in ppl.items():
                if mm != m or (m, t) not in cells or _float(p["value"]) is None:
                    continue
                ax.errorbar(float(p["value"]), float(cells[(m, t)]["value"]), xerr=_float(p["stderr"]) or 0.0,
                            yerr=_float(cells[(m, t)]["stderr"]) or 0.0, fmt=marker.get(t, "o"), color=colors(i),
                            markersize=7, capsize=2, alpha=0.8, elinewidth=0.8)
        handles = [Line2D([], [], color=colors(i), marker="o", linestyle="", label=m) for i, m in enumerate(methods)
                   if any(mm == m for mm, _ in ppl)]
        handles += [Line2D([], [], color="0.4", marker=marker[t], linestyle="", label=t.removeprefix("diffmas_"))
                    for t in shown]
        values = [float(p["value"]) for p in ppl.values() if _float(p["value"])]
        log = bool(values) and max(values) / min(values) > 10
        if log:
            ax.set_xscale("log")
        ax.set_xlabel("answer perplexity under the model that wrote it" + (" (log scale)" if log else "")
                      + "; lower = more stable")
        ax.set_ylabel("headline score")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{models}\nanswer perplexity against the score (one point per method x task; bars: stderr)",
                     fontsize=10)
        paths.append(_save(fig, ax, out / STABILITY_CHARTS[1], handles=handles, fontsize=8, ncol=2))
    return paths


def headline(rows: list[dict], charts_dir: str | None = None, comparison_rows: list[dict] | None = None) -> str:
    """README.md's short results section: the model and items, the table, what is beyond noise, one chart."""
    text = (budgets(rows).split("\n", 1)[0] + "\n\n" + markdown(rows) + "\n\n"
            + noise(rows, comparison_rows, short=True))
    if charts_dir is not None:
        text += f"\n\n![{CHARTS[0][:-4]}]({charts_dir}{CHARTS[0]})"
    return text + "\n"


def update_readme(readme: Path, rows: list[dict], charts_dir: str = "leaderboards/",
                  comparison_rows: list[dict] | None = None) -> bool:
    """Regenerate every results section ``readme`` has markers for: ``leaderboard`` (the whole document, the
    docs page) and ``headline`` (README.md's short one); True if the file changed. A file with neither is an
    error that gives the markers to paste. ``comparison_rows``: ``compare.comparisons`` of the per-item scores."""
    text = Path(readme).read_text()
    changed = False
    if "<!-- headline:start" in text:
        changed |= replace_section(readme, "headline", headline(rows, charts_dir, comparison_rows), HEADLINE_COMMAND)
    if "<!-- leaderboard:start" in text or "<!-- headline:start" not in text:
        changed |= replace_section(readme, "leaderboard", document(rows, charts_dir, comparison_rows),
                                   README_COMMAND)
    return changed
