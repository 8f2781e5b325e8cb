"""The leaderboard's charts (matplotlib, an optional extra: ``pip install 'diffmas-eval[leaderboard]'``): accuracy,
accuracy against tokens, the paired differences, the stability curves and the trainings' loss curves; each a
function of the CSVs' rows.
"""

from __future__ import annotations

from pathlib import Path

from ...extras import require
from ..grid.settings import primary_metric
from .tables import as_float, choice_tasks, methods_and_tasks, primary, read_csv

CHARTS = ("accuracy.png", "accuracy_vs_tokens.png")


DIFFERENCES_CHART = "differences.png"  # the paired differences of the multiple-choice tasks (compare.py)


STABILITY_CHARTS = ("entropy_curve.png", "perplexity_vs_accuracy.png")  # drawn when the results carry stability


def charted_pairs(rows: list[dict], comparison_rows: list[dict] | None) -> list[dict]:
    """The comparisons ``differences_chart`` draws: the multiple-choice tasks' (every task's when none is)."""
    tasks = methods_and_tasks(rows)[1]
    shown = choice_tasks(tasks) or tasks
    return [r for r in comparison_rows or [] if r["task"] in shown and r["metric"] == primary_metric(r["task"])]


def save_figure(fig, ax, path: Path, grid: str = "both", **legend) -> Path:
    """Every chart's last steps in one place (legend, light grid, tight layout, 110 dpi), so the charts match."""
    import matplotlib.pyplot as plt  # optional extra: leaderboard

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
    import matplotlib.pyplot as plt  # optional extra: leaderboard


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
                es.append(1.96 * (as_float(r["stderr"]) or 0.0))
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=m, color=colors(i), error_kw={"elinewidth": 0.8,
                                                                                      "alpha": 0.6})
        for x, y, e in zip(xs, ys, es):  # the value above each bar and its error bar: a 0 is a result, not a gap
            ax.text(x, y + e + 0.01, f"{y:.2f}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([f"{t.removeprefix('diffmas_')}\n({primary_metric(t)})" for t in tasks], fontsize=8)
    ax.set_ylabel("score (error bar: 95% interval, ± 1.96 stderr)")
    ax.set_ylim(0, min(1.1, max([float(r["value"]) + 1.96 * (as_float(r["stderr"]) or 0) for (_, t), r in cells.items()
                                 if t in tasks] + [0.4]) + 0.12))
    ax.set_title(f"{models}: score per task (n = {', '.join(ns)} items per task)", fontsize=10)
    paths = [save_figure(fig, ax, out / CHARTS[0], "y", ncol=len(methods), fontsize=8, loc="upper center",
                   bbox_to_anchor=(0.5, -0.14), frameon=False)]
    shown = charted_pairs(rows, comparison_rows)
    if shown:
        paths.append(differences_chart(shown, out, models))

    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    for i, m in enumerate(methods):
        pts = [(as_float(r["tokens_per_sample"]), float(r["value"]), as_float(r["stderr"]) or 0.0)
               for t in every if (r := cells.get((m, t))) is not None and as_float(r["tokens_per_sample"]) is not None]
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
    paths.append(save_figure(fig, ax, out / CHARTS[1], fontsize=8, loc="upper right"))
    loss = loss_chart(losses or [], out, models)
    return paths + stability_charts(rows, out, models) + ([loss] if loss else [])


def differences_chart(rows: list[dict], out: Path, models: str) -> Path:
    """One line per comparison (method - reference on a task): the paired difference and its 95% bootstrap
    interval; a line clear of 0 is a difference beyond noise."""
    import matplotlib.pyplot as plt  # optional extra: leaderboard

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
    from matplotlib.lines import Line2D  # optional extra: leaderboard

    handles = [Line2D([], [], color=colors(i), marker="o", linestyle="", label=t.removeprefix("diffmas_"))
               for i, t in enumerate(tasks)]
    return save_figure(fig, ax, out / DIFFERENCES_CHART, "x", handles=handles, fontsize=8, loc="best")


def stability_charts(rows: list[dict], out: Path, models: str) -> list[Path]:
    """Entropy along the answer (mean curve per method, over its generative tasks; from entropy_curve.csv)
    and answer perplexity against the headline score (one point per method x generative task)."""
    import matplotlib.pyplot as plt  # optional extra: leaderboard

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
        paths.append(save_figure(fig, ax, out / STABILITY_CHARTS[0], fontsize=8))
    ppl = {(r["method"], r["task"]): r for r in rows if r["metric"] == "answer_perplexity"}
    cells = primary(rows)
    if ppl:
        from matplotlib.lines import Line2D  # optional extra: leaderboard

        fig, ax = plt.subplots(figsize=(7.5, 5.0))
        # colour = method, marker = task (text labels pile up where many cells score 0)
        shown = [t for t in methods_and_tasks(rows)[1] if any(tt == t for _, tt in ppl)]
        marker = dict(zip(shown, "osD^vPX*<>h"))
        for i, m in enumerate(methods):
            for (mm, t), p in ppl.items():
                if mm != m or (m, t) not in cells or as_float(p["value"]) is None:
                    continue
                ax.errorbar(float(p["value"]), float(cells[(m, t)]["value"]), xerr=as_float(p["stderr"]) or 0.0,
                            yerr=as_float(cells[(m, t)]["stderr"]) or 0.0, fmt=marker.get(t, "o"), color=colors(i),
                            markersize=7, capsize=2, alpha=0.8, elinewidth=0.8)
        handles = [Line2D([], [], color=colors(i), marker="o", linestyle="", label=m) for i, m in enumerate(methods)
                   if any(mm == m for mm, _ in ppl)]
        handles += [Line2D([], [], color="0.4", marker=marker[t], linestyle="", label=t.removeprefix("diffmas_"))
                    for t in shown]
        values = [float(p["value"]) for p in ppl.values() if as_float(p["value"])]
        log = bool(values) and max(values) / min(values) > 10
        if log:
            ax.set_xscale("log")
        ax.set_xlabel("answer perplexity under the model that wrote it" + (" (log scale)" if log else "")
                      + "; lower = more stable")
        ax.set_ylabel("headline score")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{models}\nanswer perplexity against the score (one point per method x task; bars: stderr)",
                     fontsize=10)
        paths.append(save_figure(fig, ax, out / STABILITY_CHARTS[1], handles=handles, fontsize=8, ncol=2))
    return paths


CHART = "training_loss.png"


def loss_chart(losses: list[dict], out: Path, models: str) -> Path | None:
    """Training loss against step, one line per adapter (colour: method; style: family)."""
    if not losses:
        return None
    import matplotlib.pyplot as plt  # optional extra: leaderboard


    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    colors, styles = plt.get_cmap("tab10"), ["-", "--", ":", "-."]
    methods = sorted({r["method"] for r in losses})
    families = sorted({r["family"] for r in losses})
    for adapter in sorted({r["adapter"] for r in losses}):
        pts = sorted((int(r["step"]), float(r["loss"])) for r in losses if r["adapter"] == adapter)
        first = next(r for r in losses if r["adapter"] == adapter)
        color, style = colors(methods.index(first["method"])), styles[families.index(first["family"]) % 4]
        steps, loss = [p[0] for p in pts], [p[1] for p in pts]
        window = max(1, len(pts) // 10)  # a step's loss is one batch's: the running mean shows the trend
        mean = [sum(loss[max(0, i - window + 1):i + 1]) / len(loss[max(0, i - window + 1):i + 1])
                for i in range(len(loss))]
        ax.plot(steps, loss, style, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, mean, style, color=color, linewidth=1.6,
                label=f"{first['method']} ({first['family']})" + (f", mean of {window}" if window > 1 else ""))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (cross-entropy on the answer; faint: per step)")
    ax.set_title(f"{models}: training loss of each adapter", fontsize=10)
    return save_figure(fig, ax, out / CHART, fontsize=8)
