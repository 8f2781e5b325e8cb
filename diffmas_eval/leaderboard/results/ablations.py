"""What ``diffmas-eval ablate`` writes: three tidy CSVs, a summary with paired bootstrap intervals, charts and
README's ablations section.

- ``ablations.csv``: one row per (axis, variant, seed): the cell's accuracy and what identifies it;
- ``ablation_items.csv``: every cell's per-item scores (by ``config_hash``), what the paired intervals need;
- ``gradients.csv``: per-agent gradient norms at step 0 and after training;
- ``ablations.json``: the options the grid ran with and how long it took.

Everything after the run is a function of these files, so ``--readme`` regenerates the section from them alone
and running it twice changes nothing. The interval of "variant - reference" is a paired bootstrap over items: each
item's score is averaged over the seeds a cell ran with, the item-level differences are resampled 2000 times
(fixed generator), and the 2.5 / 97.5 percentiles of their mean are shown: the variance the items add; the
spread over seeds is the std column.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from ...commands.readme import end_marker, replace_section, start_marker
from ...extras import require
from ..grid.ablations import is_reference, probe_path
from ..grid.cells import META, result_path
from ..grid.settings import primary_metric, short_hash
from .charts import save_figure
from .stats import BOOTSTRAP, paired_bootstrap
from .tables import read_csv

CELL_FIELDS = ["axis", "variant", "method", "trained", "reference", "seed", "agents", "latent_steps", "trace",
               "stage1_grad", "realign", "task", "metric", "value", "n", "config_hash", "adapter", "source"]
ITEM_FIELDS = ["config_hash", "doc_id", "score"]
GRADIENT_FIELDS = ["axis", "variant", "seed", "when", "agents", "latent_steps", "trace", "agent", "role", "norm"]
DOCS_PAGE = "docs/ablations.md"
README_COMMAND = f"diffmas-eval ablate --readme {DOCS_PAGE}"
README_START, README_END = start_marker("ablations", README_COMMAND), end_marker("ablations")
CHARTS = ("ablation_latent_steps.png", "ablation_deltas.png", "ablation_gradients.png")


def _write(path: Path, fields: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _read(path: Path) -> list[dict]:
    return read_csv(path, "diffmas-eval ablate")


def _relative(path: str) -> str:
    """A path under the working directory as a relative one (the CSVs are committed; made anywhere, read anywhere)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd())) if path else ""
    except ValueError:
        return path


# -- rows from the run's files -----------------------------------------------------------------------
def publish(plan, opts, output: Path) -> list[dict]:
    """The CSVs, charts and Markdown of a finished grid (``ablate.Plan``, read by its fields); returns the cells'
    rows."""

    metric = primary_metric(opts.task)
    rows, items, grads, seen = [], [], [], set()
    for v, seed, s in plan.cells:
        path = result_path(plan.runs, s, v.method, opts.task)
        results = json.loads(path.read_text())
        meta = results[META]
        chain = dict(v.chain)
        rows.append({"axis": v.axis, "variant": v.value, "method": v.method, "trained": v.trained,
                     "reference": is_reference(v, opts.ref_agents, opts.ref_steps), "seed": seed,
                     "agents": v.agents, "latent_steps": v.latent_steps, "trace": chain.get("trace", "concat"),
                     "stage1_grad": chain.get("stage1_grad", "full"),
                     "realign": "trained" if chain.get("train_realign") else "fixed", "task": opts.task,
                     "metric": metric, "value": results["results"][opts.task][f"{metric},none"],
                     "n": len(meta.get("per_item", {})), "config_hash": meta["config_hash"],
                     "adapter": _relative(meta.get("adapter", "")), "source": _relative(str(path))})
        if meta["config_hash"] not in seen:
            seen.add(meta["config_hash"])
            items += [{"config_hash": meta["config_hash"], "doc_id": k, "score": x}
                      for k, x in sorted(meta.get("per_item", {}).items(), key=lambda kv: int(kv[0]))]
        if v.trained:
            for when in ("step0", "trained"):
                data = json.loads(probe_path(s, plan.family, plan.data, opts.probe_rows, plan.probes,
                                             when == "trained").read_text())
                grads += [{"axis": v.axis, "variant": v.value, "seed": seed, "when": when, "agents": v.agents,
                           "latent_steps": v.latent_steps, "trace": data["trace"], "agent": k + 1, "role": role,
                           "norm": norm} for k, (role, norm) in enumerate(zip(data["roles"], data["norms"]))]
    out = output.parent
    _write(output, CELL_FIELDS, rows)
    _write(out / "ablation_items.csv", ITEM_FIELDS, items)
    _write(out / "gradients.csv", GRADIENT_FIELDS, grads)
    info = {k: getattr(opts, k) for k in ("model", "task", "limit", "axes", "latent_steps", "agents", "ref_agents",
                                          "ref_steps", "seeds", "train_steps", "train_batch_size", "probe_rows")}
    info["grid_hash"] = short_hash(info)
    (out / "ablations.json").write_text(json.dumps(info, indent=1) + "\n")
    for path in charts(rows, grads, out):
        print(f"wrote {path}")
    (out / "ablations.md").write_text("# Ablations\n\n" + document(rows, items, grads, info, ""))
    print(f"wrote {output}, {out / 'ablation_items.csv'}, {out / 'gradients.csv'} and {out / 'ablations.md'}")
    return rows


# -- statistics ----------------------------------------------------------------------------------------
def _per_item(rows: list[dict], items: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each item's score averaged over the seeds of ``rows`` (the cells of one variant)."""
    scores: dict[str, list[float]] = {}
    for r in rows:
        for doc, x in items.get(r["config_hash"], {}).items():
            scores.setdefault(doc, []).append(float(x))
    return {doc: statistics.fmean(xs) for doc, xs in scores.items()}


def _by_cell(item_rows: list[dict]) -> dict[str, dict[str, float]]:
    """``ablation_items.csv``'s rows as config_hash -> doc_id -> score."""
    items: dict[str, dict[str, float]] = {}
    for r in item_rows:
        items.setdefault(r["config_hash"], {})[r["doc_id"]] = float(r["score"])
    return items


def summary(rows: list[dict], item_rows: list[dict]) -> list[dict]:
    """Per (axis, variant, trained): mean and std over seeds, and the paired interval against the axis's reference
    of the same training."""
    items = _by_cell(item_rows)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["axis"], r["variant"], str(r["trained"])), []).append(r)
    out = []
    for (axis, variant, trained), cells in groups.items():
        ref = next((g for (a, _, t), g in groups.items() if a == axis and t == trained
                    and str(g[0]["reference"]) == "True"), None)
        values = [float(c["value"]) for c in cells]
        row = {"axis": axis, "variant": variant, "trained": trained == "True", "seeds": len(cells),
               "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
               "reference": str(cells[0]["reference"]) == "True", "n": cells[0]["n"]}
        if ref is not None and not row["reference"]:
            row["delta"], row["ci_low"], row["ci_high"], row["paired_items"] = paired_bootstrap(
                _per_item(cells, items), _per_item(ref, items))
        out.append(row)
    return out


def training_effects(rows: list[dict], item_rows: list[dict]) -> list[dict]:
    """Per variant scored both ways (the latent_steps axis): trained minus untrained, the same chain on the same
    items, with its paired interval: the method's claim that training the chain end to end helps."""
    items = _by_cell(item_rows)
    groups: dict[tuple, dict[bool, list[dict]]] = {}
    for r in rows:
        groups.setdefault((r["axis"], r["variant"]), {}).setdefault(str(r["trained"]) == "True", []).append(r)
    out = []
    for (axis, variant), by in groups.items():
        if True in by and False in by:
            delta, low, high, n = paired_bootstrap(_per_item(by[True], items), _per_item(by[False], items))
            mean = {k: statistics.fmean(float(c["value"]) for c in by[k]) for k in (True, False)}
            out.append({"axis": axis, "variant": variant, "untrained": mean[False], "trained": mean[True],
                        "delta": delta, "ci_low": low, "ci_high": high, "paired_items": n})
    return out


# -- Markdown and charts ---------------------------------------------------------------------------------
def document(rows: list[dict], item_rows: list[dict], grads: list[dict], info: dict, charts_dir: str | None) -> str:
    table = ["| axis | variant | trained | seeds | accuracy (mean ± std over seeds) | Δ vs reference [95% CI] |",
             "|---|---|---|---|---|---|"]
    for r in summary(rows, item_rows):
        spread = (f"{r['mean']:.3f} ± {r['std']:.3f}" if r["seeds"] > 1 else
                  f"{r['mean']:.3f} (one seed)" if r["trained"] else f"{r['mean']:.3f} (seed-independent)")
        delta = ("reference" if r["reference"] else
                 f"{r['delta']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]" if "delta" in r else "")
        table.append(f"| {r['axis']} | {r['variant']} | {'yes' if r['trained'] else 'no'} | {r['seeds']} | {spread} "
                     f"| {delta} |")
    head = (f"Model `{info['model']}`, task `{info['task']}` (first {info['limit']} items, the same for every cell), "
            f"reference chain: {info['ref_agents']} agents, {info['ref_steps']} latent steps, concatenated trace, "
            f"stage 1 trained through, fixed ridge realignment; each variant changes one axis. Trained variants: "
            f"LoRA, {info['train_steps']} optimizer steps x batch {info.get('train_batch_size', 1)}, "
            f"seeds {', '.join(map(str, info['seeds']))}; untrained "
            "ones decode greedily and do not depend on the seed (scored once). Δ: paired bootstrap over items "
            f"({BOOTSTRAP} resamples) of the seed-averaged per-item scores.")
    effects = training_effects(rows, item_rows)
    if effects:
        table += ["", "What training adds: the same chain trained minus untrained, paired over the same items:", "",
                  "| axis | variant | untrained | trained | Δ [95% CI] |", "|---|---|---|---|---|"]
        table += [f"| {e['axis']} | {e['variant']} | {e['untrained']:.3f} | {e['trained']:.3f} | "
                  f"{e['delta']:+.3f} [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}] |" for e in effects]
    text = head + "\n\n" + "\n".join(table) + "\n\n" + gradient_table(grads)
    if charts_dir is not None:
        text += "\n\n" + "\n".join(f"![{c[:-4]}]({charts_dir}{c})" for c in CHARTS)
    return text + "\n"


def _grad_groups(grads: list[dict]) -> dict[tuple, dict[int, list[float]]]:
    out: dict[tuple, dict[int, list[float]]] = {}
    for g in grads:
        key = (g["axis"], g["variant"], g["when"])
        out.setdefault(key, {}).setdefault(int(g["agent"]), []).append(float(g["norm"]))
    return out


def gradient_table(grads: list[dict]) -> str:
    """Per variant, step 0 and trained: the mean norm per upstream agent (1 = the farthest from the final agent)."""
    lines = ["Per-agent gradient norm ‖∂loss/∂segment‖ (mean over seeds; agent 1 is the farthest from the final "
             "agent; first/last: how much the farthest agent's gradient is attenuated):", "",
             "| axis | variant | when | per upstream agent | first/last |", "|---|---|---|---|---|"]
    for (axis, variant, when), per in _grad_groups(grads).items():
        means = [statistics.fmean(per[k]) for k in sorted(per)]
        ratio = f"{means[0] / means[-1]:.3f}" if means and means[-1] > 0 else ""
        lines.append(f"| {axis} | {variant} | {when} | {', '.join(f'{m:.2e}' for m in means)} | {ratio} |")
    return "\n".join(lines)


def charts(rows: list[dict], grads: list[dict], out: Path) -> list[Path]:
    """Accuracy vs latent steps; every variant's Δ with its interval; gradient norm vs depth (concat, overwrite)."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional extra: leaderboard


    paths = []
    summ = summary(rows, _read(out / "ablation_items.csv")) if (out / "ablation_items.csv").exists() else []
    steps = [r for r in summ if r["axis"] == "latent_steps"]
    if steps:
        fig, ax = plt.subplots(figsize=(6, 4))
        for trained, style in ((False, "o--"), (True, "s-")):
            pts = sorted((int(r["variant"]), r["mean"], r["std"]) for r in steps if r["trained"] == trained)
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, markersize=5 if trained else 10,
                            mfc=None if trained else "none",  # hollow and larger: visible where the lines coincide
                            label="trained (diffmas)" if trained else "untrained (latentmas)")
        ax.set_xlabel("latent steps per upstream agent")
        ax.set_ylabel(f"{rows[0]['metric']} on {rows[0]['task']} (n={rows[0]['n']})")
        ax.set_title("Accuracy vs latent steps (error bars: std over seeds)")
        paths.append(save_figure(fig, ax, out / CHARTS[0]))
    deltas = [r for r in summ if "delta" in r]
    if deltas:
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(deltas) + 1.5))
        labels = [f"{r['axis']}={r['variant']}{'' if r['trained'] else ' (untrained)'}" for r in deltas]
        ys = list(range(len(deltas)))[::-1]
        ax.errorbar([r["delta"] for r in deltas], ys, xerr=[[r["delta"] - r["ci_low"] for r in deltas],
                                                             [r["ci_high"] - r["delta"] for r in deltas]],
                    fmt="o", capsize=3, label="Δ vs the axis's reference (95% paired bootstrap CI)")
        ax.axvline(0, color="grey", lw=1)
        ax.set_yticks(ys, labels, fontsize=8)
        ax.set_xlabel("accuracy difference")
        ax.set_ylim(-0.8, len(deltas) + 0.3)  # room above the first row for the legend
        paths.append(save_figure(fig, ax, out / CHARTS[1], grid="x", fontsize=8, loc="upper right"))
    trace = {k: v for k, v in _grad_groups(grads).items() if k[0] == "trace" and k[1] in ("concat", "overwrite")}
    if trace:
        fig, ax = plt.subplots(figsize=(6, 4))
        for (_, variant, when), per in sorted(trace.items()):
            ks = sorted(per)
            ax.errorbar(ks, [statistics.fmean(per[k]) for k in ks],
                        yerr=[statistics.stdev(per[k]) if len(per[k]) > 1 else 0 for k in ks], capsize=3,
                        fmt=("s-" if variant == "concat" else "o--"), alpha=1.0 if when == "trained" else 0.55,
                        label=f"{variant}, {'after training' if when == 'trained' else 'step 0'}")
        ax.set_yscale("log")
        ax.set_xticks(sorted({k for per in trace.values() for k in per}))
        ax.set_xlabel("upstream agent (1 = farthest from the final agent)")
        ax.set_ylabel("‖∂loss/∂segment‖")
        ax.set_title("Gradient reaching each agent: concat vs overwrite")
        paths.append(save_figure(fig, ax, out / CHARTS[2], fontsize=8))
    return paths


def update_readme(readme: Path, output: Path, charts_dir: str = "leaderboards/ablations/") -> bool:
    """Replace the section of the page (docs/ablations.md) between the markers with the one made from the CSVs;
    True if it changed."""
    out = output.parent
    section = document(_read(output), _read(out / "ablation_items.csv"), _read(out / "gradients.csv"),
                       json.loads((out / "ablations.json").read_text()), charts_dir)
    return replace_section(readme, "ablations", section, README_COMMAND)
