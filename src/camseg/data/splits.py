"""Patient-level splits: slices of one patient (``group``) never sit on two sides."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from camseg.constants import SPLITS
from camseg.data.folder import Sample
from camseg.errors import ConfigError


def assign_splits(
    samples: list[Sample], val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> dict[str, list[Sample]]:
    """Split samples into train/val/test by group.

    Groups with a ``split`` value in labels.csv keep it; the other groups are shuffled
    (seeded) within strata of "has a positive of class k" patterns and dealt out so that
    each split receives about its fraction of groups and of positive groups.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` in the original row order.
    """
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise ConfigError(
            f"data.val_fraction={val_fraction}, data.test_fraction={test_fraction}: each in [0,1) and their sum below 1"
        )
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.group].append(s)
    fixed: dict[str, str] = {}
    for g, ss in groups.items():
        splits = {s.split for s in ss if s.split}
        if splits:
            fixed[g] = next(iter(splits))
    free = sorted(g for g in groups if g not in fixed)

    strata: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for g in free:
        pattern = tuple(int(any(s.labels[k] for s in groups[g])) for k in range(len(groups[g][0].labels)))
        strata[pattern].append(g)
    rng = np.random.default_rng(seed)
    assignment = dict(fixed)
    # Deal each stratum out with cumulative rounding so small datasets still get val/test groups.
    carry = {"val": 0.0, "test": 0.0}
    for pattern in sorted(strata):
        gs = strata[pattern]
        order = [gs[i] for i in rng.permutation(len(gs))]
        n = len(order)
        want_val = n * val_fraction + carry["val"]
        want_test = n * test_fraction + carry["test"]
        n_val, n_test = int(round(want_val)), int(round(want_test))
        if n_val + n_test >= n and n > 0:
            n_test = min(n_test, max(n - 1 - n_val, 0))
            n_val = min(n_val, max(n - 1 - n_test, 0))
        carry["val"], carry["test"] = want_val - n_val, want_test - n_test
        for i, g in enumerate(order):
            assignment[g] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    out: dict[str, list[Sample]] = {k: [] for k in SPLITS}
    for s in samples:
        out[assignment[s.group]].append(s)
    return out
