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
DIFFERENCES_CHART = "differences.png"  # the paired differences of the multiple-choice tasks (compare.py)
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


def choice_tasks(tasks: list[str]) -> list[str]:
    """The multiple-choice tasks among ``tasks``: the registry's, and any other lm-eval task scored by ``acc``."""
    from ..tasks.registry import TASKS

    return [t for t in tasks if (TASKS[t].kind == "multiple_choice" if t in TASKS else primary_metric(t) == "acc")]


def interval(r: dict) -> str:
    """'0.29 [0.22, 0.36]': the value and its normal 95% interval (1.96 stderr), clipped to [0, 1]."""
    value, se = float(r["value"]), _float(r["stderr"])
    if se is None:
        return f"{value:.2f}"
    return f"{value:.2f} [{max(0.0, value - 1.96 * se):.2f}, {min(1.0, value + 1.96 * se):.2f}]"


def markdown(rows: list[dict], only: list[str] | None = None, intervals: bool = False, costs: bool = True) -> str:
    """Methods as rows, tasks as columns (headline metric, value ± stderr, or with ``intervals`` its 95%
    interval), then tokens and seconds per sample (``costs``); ``only``: these tasks (default: all)."""
    cells = primary(rows)
    methods, tasks = methods_and_tasks(rows)
    tasks = [t for t in tasks if any((m, t) in cells for m in methods) and (only is None or t in only)]
    columns = " | ".join(f"{t} ({primary_metric(t)})" for t in tasks)
    header = f"| method | {columns} |" + (" tokens / sample | s / sample |" if costs else "")
    lines = [header, "|---" * (len(tasks) + 1 + 2 * costs) + "|"]
    for m in methods:
        vals, toks, secs = [], [], []
        for t in tasks:
            r = cells.get((m, t))
            if r is None:
                vals.append("")
                continue
            se = _float(r["stderr"])
            vals.append(interval(r) if intervals else f"{float(r['value']):.2f} ± {se:.2f}" if se is not None
                        else f"{float(r['value']):.2f}")
            if _float(r["tokens_per_sample"]) is not None:
                toks.append(float(r["tokens_per_sample"]))
            if _float(r["seconds_per_sample"]) is not None:
                secs.append(float(r["seconds_per_sample"]))
        if any(vals):
            lines.append(f"| {m} | " + " | ".join(vals) + (f" | {_mean(toks, '.0f')} | {_mean(secs, '.1f')} |"
                                                             if costs else " |"))
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


def _items(cells: dict, tasks: list[str]) -> str:
    """'150' or '5/150': the item counts of ``tasks``' cells, in numeric order."""
    return "/".join(map(str, sorted({int(float(r["n"])) for (_, t), r in cells.items() if t in tasks
                                     and _float(r["n"]) is not None})))


def _sections(rows: list[dict]) -> tuple[list[str], list[str]]:
    """(multiple-choice tasks, the others) of the rows: the results a CPU-sized leaderboard can compare, and the
    pipeline check beside them."""
    tasks = methods_and_tasks(rows)[1]
    choice = choice_tasks(tasks)
    return choice, [t for t in tasks if t not in choice]


def _charted_pairs(rows: list[dict], comparison_rows: list[dict] | None) -> list[dict]:
    """The comparisons ``differences_chart`` draws: the multiple-choice tasks' (every task's when none is)."""
    tasks = methods_and_tasks(rows)[1]
    shown = choice_tasks(tasks) or tasks
    return [r for r in comparison_rows or [] if r["task"] in shown and r["metric"] == primary_metric(r["task"])]


def verdict(comparison_rows: list[dict], tasks: list[str]) -> str:
    """One sentence per question the method raises, answered by the paired differences on ``tasks``: does
    training the chain help (diffmas - latentmas), and does it beat one agent trained the same way (diffmas -
    single-sft)? Empty when the leaderboard lacks those methods."""
    questions = (("latentmas", "Training the chain (`diffmas` − `latentmas`, the same chain untrained)"),
                 ("single-sft", "The trained chain against one agent trained on the same rows (`diffmas` − "
                                "`single-sft`)"))
    out = []
    for reference, label in questions:
        found = [r for r in comparison_rows if r["method"] == "diffmas" and r["reference"] == reference
                 and r["task"] in tasks and r["metric"] == primary_metric(r["task"])]
        if found:
            parts = [f"{float(r['delta']):+.2f} [{float(r['ci_low']):+.2f}, {float(r['ci_high']):+.2f}] on "
                     f"{r['task']} ({'beyond noise' if str(r['beyond_noise']) == 'True' else 'within noise'})"
                     for r in found]
            out.append(f"{label}: {'; '.join(parts)}.")
    return " ".join(out)


def results(rows: list[dict], comparison_rows: list[dict] | None, training_rows: list[dict] | None = None,
            full: bool = False) -> str:
    """The results in the order a reader should weigh them: the multiple-choice tasks with 95% intervals, their
    paired differences, then the generative and code tasks as a labelled pipeline check (``full``: every
    comparison, not only the multiple-choice ones)."""
    from . import compare
    from .adapters import budgets as adapter_budgets

    choice, rest = _sections(rows)
    cells = primary(rows)
    rest_n = _items(cells, rest)
    text = ""
    if choice:
        text += (f"**Multiple choice** (the first {_items(cells, choice)} items of each; accuracy with its 95% "
                 "interval, value ± 1.96 stderr):\n\n" + markdown(rows, choice, intervals=True, costs=False) + "\n\n")
        paired = [r for r in comparison_rows or [] if full or r["task"] in choice]
        said = verdict(comparison_rows or [], choice)
        if said:
            text += said + "\n\n"
        if paired:
            text += compare.table(paired) + "\n\n"
    if training_rows:
        text += f"Training budget (LoRA steps x batch): {adapter_budgets(training_rows)}.\n\n"
    if rest:
        text += (f"**Pipeline check** (generative and code tasks, the first {rest_n} items of each: every method runs "
                 f"end to end and what it costs shows; at n = {rest_n} a score cannot rank the methods):\n\n"
                 + markdown(rows, rest) + "\n\n")
    return text + noise(rows, comparison_rows)


def document(rows: list[dict], charts_dir: str | None = None, comparison_rows: list[dict] | None = None,
             training_rows: list[dict] | None = None) -> str:
    """leaderboard.md: the budgets, the results (``results``), the stability metrics, the adapters, the charts."""
    from .adapters import CHART, table

    text = budgets(rows) + "\n\n" + results(rows, comparison_rows, training_rows, full=True) + "\n\n" + (
        "Tokens per sample: generated tokens, every agent's (DiffMAS's upstream agents generate none; they take "
        "latent steps), averaged over the tasks; seconds per sample: wall time of a batch / its samples (for "
        "`single`/`single-sft`, the task's wall time / items, model loading included). All metrics (acc_norm, "
        "HumanEval base tests) are in `leaderboard.csv`.")
    stab = stability_table(rows)
    if stab:
        text += "\n\n" + stab
    if training_rows:
        text += "\n\n" + table(training_rows).replace(f"]({CHART})", f"]({charts_dir or ''}{CHART})")
    if charts_dir is not None:
        shown = (CHARTS[0], *((DIFFERENCES_CHART,) if _charted_pairs(rows, comparison_rows) else ()), CHARTS[1],
                 *(STABILITY_CHARTS if stab else ()), *((CHART,) if training_rows else ()))
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


def charts(rows: list[dict], out: Path, comparison_rows: list[dict] | None = None,
           losses: list[dict] | None = None) -> list[Path]:
    """Accuracy per multiple-choice task and method (error bars: 95% interval; every task when none is multiple
    choice); the paired differences; score against tokens per sample; stability; the adapters' training loss."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .adapters import chart as loss_chart

    cells = primary(rows)
    methods, every = methods_and_tasks(rows)
    every = [t for t in every if any((m, t) in cells for m in methods)]
    tasks = choice_tasks(every) or every  # a 5-item generative column is a pipeline check, not a bar to compare
    colors = plt.get_cmap("tab10")
    out.mkdir(parents=True, exist_ok=True)
    models = ", ".join(sorted({r["model"] for r in rows}))
    ns = sorted({str(r["n"]) for (_, t), r in cells.items() if t in tasks}, key=lambda n: float(n or 0))

    fig, ax = plt.subplots(figsize=(max(7.0, 1.5 * len(tasks) + 2), 5.2))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        xs, ys, es = [], [], []
        for j, t in enumerate(tasks):
            r = cells.get((m, t))
            if r is not None:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(float(r["value"]))
                es.append(1.96 * (_float(r["stderr"]) or 0.0))
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=m, color=colors(i), error_kw={"elinewidth": 0.8,
                                                                                      "alpha": 0.6})
        for x, y, e in zip(xs, ys, es):  # the value above each bar and its error bar: a 0 is a result, not a gap
            ax.text(x, y + e + 0.01, f"{y:.2f}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([f"{t.removeprefix('diffmas_')}\n({primary_metric(t)})" for t in tasks], fontsize=8)
    ax.set_ylabel("score (error bar: 95% interval, ± 1.96 stderr)")
    ax.set_ylim(0, min(1.1, max([float(r["value"]) + 1.96 * (_float(r["stderr"]) or 0) for (_, t), r in cells.items()
                                 if t in tasks] + [0.4]) + 0.12))
    ax.set_title(f"{models}: score per task (n = {', '.join(ns)} items per task)", fontsize=10)
    paths = [_save(fig, ax, out / CHARTS[0], "y", ncol=len(methods), fontsize=8, loc="upper center",
                   bbox_to_anchor=(0.5, -0.14), frameon=False)]
    shown = _charted_pairs(rows, comparison_rows)
    if shown:
        paths.append(differences_chart(shown, out, models))

    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    for i, m in enumerate(methods):
        pts = [(_float(r["tokens_per_sample"]), float(r["value"]), _float(r["stderr"]) or 0.0)
               for t in every if (r := cells.get((m, t))) is not None and _float(r["tokens_per_sample"]) is not None]
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
    ax.set_title(f"{models}: score against tokens per sample\n(large: mean over the {len(every)} tasks; "
                 "small: one task)", fontsize=10)
    paths.append(_save(fig, ax, out / CHARTS[1], fontsize=8, loc="upper right"))
    loss = loss_chart(losses or [], out, models)
    return paths + stability_charts(rows, out, models) + ([loss] if loss else [])


def differences_chart(rows: list[dict], out: Path, models: str) -> Path:
    """One line per comparison (method - reference on a task): the paired difference and its 95% bootstrap
    interval; a line clear of 0 is a difference beyond noise."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 1.3 + 0.32 * len(rows)))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    colors = plt.get_cmap("tab10")
    labels = []
    for y, r in enumerate(reversed(rows)):
        d, lo, hi = float(r["delta"]), float(r["ci_low"]), float(r["ci_high"])
        beyond = lo > 0 or hi < 0
        ax.errorbar(d, y, xerr=[[d - lo], [hi - d]], fmt="o", markersize=5, capsize=3,
                    color=colors(tasks.index(r["task"])), mfc=None if beyond else "white")
        labels.append(f"{r['method']} − {r['reference']}")
    ax.axvline(0, color="0.3", linewidth=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("paired difference over the same items\n(95% bootstrap interval; filled: the interval excludes 0)")
    n = "/".join(sorted({str(r["items"]) for r in rows}))
    ax.set_title(f"{models}: paired differences (n = {n} items per task)", fontsize=10)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors(i), marker="o", linestyle="", label=t.removeprefix("diffmas_"))
               for i, t in enumerate(tasks)]
    return _save(fig, ax, out / DIFFERENCES_CHART, "x", handles=handles, fontsize=8, loc="best")


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


def headline(rows: list[dict], charts_dir: str | None = None, comparison_rows: list[dict] | None = None,
             training_rows: list[dict] | None = None) -> str:
    """README.md's short results section: the model, the results (``results``), the two charts that matter."""
    text = budgets(rows).split("\n", 1)[0] + "\n\n" + results(rows, comparison_rows, training_rows)
    if charts_dir is not None:
        shown = (CHARTS[0], *((DIFFERENCES_CHART,) if _charted_pairs(rows, comparison_rows) else ()))
        text += "\n\n" + " ".join(f"![{c[:-4]}]({charts_dir}{c})" for c in shown)
    return text + "\n"


def update_readme(readme: Path, rows: list[dict], charts_dir: str = "leaderboards/",
                  comparison_rows: list[dict] | None = None, training_rows: list[dict] | None = None) -> bool:
    """Regenerate every results section ``readme`` has markers for: ``leaderboard`` (the whole document, the
    docs page) and ``headline`` (README.md's short one); True if the file changed. A file with neither is an
    error that gives the markers to paste. ``comparison_rows``: ``compare.comparisons`` of the per-item scores."""
    text = Path(readme).read_text()
    changed = False
    if "<!-- headline:start" in text:
        changed |= replace_section(readme, "headline", headline(rows, charts_dir, comparison_rows, training_rows),
                                   HEADLINE_COMMAND)
    if "<!-- leaderboard:start" in text or "<!-- headline:start" not in text:
        changed |= replace_section(readme, "leaderboard", document(rows, charts_dir, comparison_rows, training_rows),
                                   README_COMMAND)
    return changed


def regenerate(readme: Path, output: Path) -> bool:
    """``update_readme`` from the committed files beside ``output`` alone (the CSV, the per-item scores, the
    adapters' record), so ``--readme`` needs no cell or adapter; the comparisons are recomputed from the items."""
    from . import adapters, compare

    paired = compare.comparisons(compare.read_items(output.parent))
    return update_readme(Path(readme), read_csv(output), comparison_rows=paired,
                         training_rows=adapters.read(output.parent)[0])
