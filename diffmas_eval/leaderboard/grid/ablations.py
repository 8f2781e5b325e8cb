"""The ablations' grid (``diffmas-eval ablate``): its axes and variants, the options a grid runs with, its cells, and
where each gradient probe is kept. Pure data: the runner (``ablate.py``) and the report (``results/ablations.py``) both
read it, and neither imports the other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .settings import Settings, short_hash

AXES = ("latent_steps", "agents", "trace", "stage1_grad", "realign")
# axis -> the value of the reference chain on it (the other values are the ablation's variants)
REFERENCE = {"trace": "concat", "stage1_grad": "full", "realign": "fixed"}
VARIANTS = {"trace": ("concat", "overwrite", "stitch"), "stage1_grad": ("full", "none"),
            "realign": ("fixed", "trained")}
# an axis value -> the Settings.chain override it stands for
OVERRIDE = {("trace", "overwrite"): ("trace", "overwrite"), ("trace", "stitch"): ("trace", "stitch"),
            ("stage1_grad", "none"): ("stage1_grad", "none"), ("realign", "trained"): ("train_realign", True)}


@dataclass(frozen=True)
class Variant:
    """One chain of the grid: the axis it varies and its value there; ``method`` latentmas (untrained) or
    diffmas (trained)."""

    axis: str
    value: str
    method: str
    agents: int
    latent_steps: int
    chain: tuple = ()  # Settings.chain items

    @property
    def trained(self) -> bool:
        return self.method == "diffmas"

    @property
    def name(self) -> str:
        return f"{self.axis}={self.value} ({'trained' if self.trained else 'untrained'})"

    def settings(self, base: Settings, seed: int) -> Settings:
        return dataclasses.replace(base, agents=self.agents, latent_steps=self.latent_steps, seed=seed,
                                   chain=dict(self.chain), sft_sources=dict(base.sft_sources))


def grid(axes: list[str], steps: list[int], agents: list[int], ref_agents: int, ref_steps: int) -> list[Variant]:
    """The variants of ``axes``, in order (the reference chain appears once per axis, as that axis's anchor)."""
    bad = [a for a in axes if a not in AXES]
    if bad:
        raise ValueError(f"unknown ablation axis {', '.join(bad)}; choose from {', '.join(AXES)}")
    if ref_agents < 2:
        raise ValueError(f"--ref-agents must be >= 2 (an upstream agent and the final agent), got {ref_agents}")
    if min(agents, default=2) < 2:
        raise ValueError(f"--agents values must be >= 2, got {agents}")
    if min(steps, default=0) < 0:
        raise ValueError(f"--latent-steps values must be >= 0, got {steps}")
    steps, agents = sorted({*steps, ref_steps}), sorted({*agents, ref_agents})  # each axis holds its anchor
    out = []
    for axis in axes:
        if axis == "latent_steps":
            out += [Variant(axis, str(m), method, ref_agents, m) for m in steps for method in ("latentmas", "diffmas")]
        elif axis == "agents":
            out += [Variant(axis, str(n), "diffmas", n, ref_steps) for n in agents]
        else:
            out += [Variant(axis, v, "diffmas", ref_agents, ref_steps,
                            (OVERRIDE[axis, v],) if (axis, v) in OVERRIDE else ()) for v in VARIANTS[axis]]
    return out


def reference_of(v: Variant, ref_agents: int, ref_steps: int) -> Variant:
    """The anchor a variant is compared with on the same items: the reference chain, trained as ``v`` is."""
    value = {"latent_steps": str(ref_steps), "agents": str(ref_agents)}.get(v.axis) or REFERENCE[v.axis]
    return Variant(v.axis, value, v.method, ref_agents, ref_steps)


def is_reference(v: Variant, ref_agents: int, ref_steps: int) -> bool:
    return v == reference_of(v, ref_agents, ref_steps)






def probe_path(settings: Settings, family: str, rows: Path, n_rows: int, out_dir: Path, trained: bool) -> Path:
    """Where the probe of this chain (its adapter's, when ``trained``) on these rows is kept: named by their hash."""
    spec = {"model": settings.model, "agents": settings.agents, "latent_steps": settings.latent_steps,
            "trace": settings.chain.get("trace", "concat"), "rows": rows.name, "n_rows": n_rows,
            "adapter": settings.training("diffmas", family) if trained else None}
    return out_dir / f"probe-{short_hash(spec)}.json"
