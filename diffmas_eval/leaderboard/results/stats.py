"""The paired statistics the leaderboard and the ablations share: a difference of two methods measured on the same
items, with a bootstrap interval over those items (pairing removes the items' own difficulty from the noise, which
an interval per method cannot)."""

from __future__ import annotations

import numpy as np

BOOTSTRAP = 2000


def paired_bootstrap(a: dict[str, float], b: dict[str, float], resamples: int = BOOTSTRAP, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float, int]:
    """Mean of ``a - b`` over their common items and its ``level`` percentile interval (resampling items)."""
    common = sorted(set(a) & set(b), key=lambda k: (len(k), k))
    if not common:
        return float("nan"), float("nan"), float("nan"), 0
    d = np.array([a[k] - b[k] for k in common])
    means = np.random.default_rng(seed).choice(d, size=(resamples, len(d)), replace=True).mean(axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(d.mean()), float(lo), float(hi), len(common)
