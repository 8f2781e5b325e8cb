"""The leaderboard as Markdown: the table, intervals, the noise note, the verdict sentences, the trainings' table and
the two generated sections (docs/leaderboard.md's whole one, README's headline); each a function of the CSVs' rows.
"""

from __future__ import annotations

from pathlib import Path

from ..grid.settings import LAYOUT, TEXT_METHODS, primary_metric
from . import compare
from .charts import CHART, CHARTS, DIFFERENCES_CHART, STABILITY_CHARTS, charted_pairs
from .tables import as_float, choice_tasks, methods_and_tasks, primary
from .training_records import budgets as adapter_budgets


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
    ns = sorted({int(float(r["n"])) for r in primary(rows).values() if as_float(r["n"]) is not None})
    head = (f"Model {', '.join(f'`{m}`' for m in models)}; items per task: {', '.join(map(str, ns))} (the first ones; "
            f"trained methods never saw them). Value ± stderr (lm-eval's, sqrt(p(1-p)/(n-1)) for a mean); "
            "metric per task: acc (multiple choice), exact_match (generative), pass@1 on base + plus tests "
            "(HumanEval+).")
    return head + "\n\n" + "\n".join(lines)


def _mean(xs: list[float], fmt: str) -> str:
    return format(sum(xs) / len(xs), fmt) if xs else ""


def interval(r: dict) -> str:
    """'0.29 [0.22, 0.36]': the value and its normal 95% interval (1.96 stderr), clipped to [0, 1]."""
    value, se = float(r["value"]), as_float(r["stderr"])
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
            se = as_float(r["stderr"])
            vals.append(interval(r) if intervals else f"{float(r['value']):.2f} ± {se:.2f}" if se is not None
                        else f"{float(r['value']):.2f}")
            if as_float(r["tokens_per_sample"]) is not None:
                toks.append(float(r["tokens_per_sample"]))
            if as_float(r["seconds_per_sample"]) is not None:
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
                bound = 2 * ((as_float(ra["stderr"]) or 0) ** 2 + (as_float(rb["stderr"]) or 0) ** 2) ** 0.5
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
                  and as_float(r["value"]) is not None]
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
                                     and as_float(r["n"]) is not None})))


def _sections(rows: list[dict]) -> tuple[list[str], list[str]]:
    """(multiple-choice tasks, the others) of the rows: the results a CPU-sized leaderboard can compare, and the
    pipeline check beside them."""
    tasks = methods_and_tasks(rows)[1]
    choice = choice_tasks(tasks)
    return choice, [t for t in tasks if t not in choice]


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

    text = budgets(rows) + "\n\n" + results(rows, comparison_rows, training_rows, full=True) + "\n\n" + (
        "Tokens per sample: generated tokens, every agent's (DiffMAS's upstream agents generate none; they take "
        "latent steps), averaged over the tasks; seconds per sample: wall time of a batch / its samples (for "
        "`single`/`single-sft`, the task's wall time / items, model loading included). All metrics (acc_norm, "
        "HumanEval base tests) are in `leaderboard.csv`.")
    stab = stability_table(rows)
    if stab:
        text += "\n\n" + stab
    if training_rows:
        text += "\n\n" + training_table(training_rows).replace(f"]({CHART})", f"]({charts_dir or ''}{CHART})")
    if charts_dir is not None:
        shown = (CHARTS[0], *((DIFFERENCES_CHART,) if charted_pairs(rows, comparison_rows) else ()), CHARTS[1],
                 *(STABILITY_CHARTS if stab else ()), *((CHART,) if training_rows else ()))
        text += "\n\n" + "\n".join(f"![{c[:-4]}]({charts_dir}{c})" for c in shown)
    return text + "\n"


def headline(rows: list[dict], charts_dir: str | None = None, comparison_rows: list[dict] | None = None,
             training_rows: list[dict] | None = None) -> str:
    """README.md's short results section: the model, the results (``results``), the two charts that matter."""
    text = budgets(rows).split("\n", 1)[0] + "\n\n" + results(rows, comparison_rows, training_rows)
    if charts_dir is not None:
        shown = (CHARTS[0], *((DIFFERENCES_CHART,) if charted_pairs(rows, comparison_rows) else ()))
        text += "\n\n" + " ".join(f"![{c[:-4]}]({charts_dir}{c})" for c in shown)
    return text + "\n"


def training_table(rows: list[dict]) -> str:
    """The adapters as Markdown (empty without any)."""
    if not rows:
        return ""
    lines = ["| adapter | family | agents x latent steps | steps x batch | rows | loss first → last |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["family"], r["method"])):
        steps, batch, acc = int(r["steps"]), int(r["batch_size"]), int(r["accumulation"] or 1)
        loss = (f"{float(r['loss_first']):.3f} → {float(r['loss_last']):.3f}" if r["loss_first"] not in ("", None)
                else "")
        lines.append(f"| `{r['method']}` | {r['family']} ({r['sft_format']} rows) | {r['agents']} x "
                     f"{r['latent_steps']} | {steps} x {batch}{f' x {acc}' if acc > 1 else ''} | "
                     f"{steps * batch * acc} | {loss} |")
    return ("Adapters (LoRA; `training.csv`, loss curves in `training_loss.csv` and "
            f"[{CHART}]({CHART})): single-sft and diffmas train on the same rows, steps, batch and seed.\n\n"
            + "\n".join(lines))
