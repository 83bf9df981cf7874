"""Patient-level splits: slices of one patient (``group``) never sit on two sides."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from camseg.constants import SPLITS
from camseg.data.folder import Sample
from camseg.errors import ConfigError


def assign_splits(
    samples: list[Sample],
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int | Sequence[int] = 0,
    cv_folds: int | None = None,
    cv_fold: int | None = None,
) -> dict[str, list[Sample]]:
    """Split samples into train/val/test by group.

    Groups with a ``split`` value in labels.csv keep it; the other groups are shuffled
    (seeded) within strata of "has a positive of class k" patterns and dealt out so that
    each split receives about its fraction of groups and of positive groups. A class with
    at least three positive groups gets at least one of them in val and in test (when
    their fraction is above 0), so that validation and test metrics are defined; the
    group moved there trades places with a negative one when the split has one.

    With ``cv_fold`` set, the split is fold ``cv_fold`` of a ``cv_folds``-fold
    cross-validation by patient (:func:`cv_split`); ``test_fraction`` is then unused.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` in the original row order.
    """
    if cv_fold is not None:
        return cv_split(samples, int(cv_folds or 5), int(cv_fold), val_fraction, seed)
    if not (
        0.0 <= val_fraction < 1.0
        and 0.0 <= test_fraction < 1.0
        and val_fraction + test_fraction < 1.0
    ):
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
    rng = np.random.default_rng(seed)
    assignment = dict(fixed)
    _deal_strata(assignment, groups, free, val_fraction, test_fraction, rng)
    _spread_positive_groups(
        assignment, groups, free, {"val": val_fraction, "test": test_fraction}, rng
    )
    out: dict[str, list[Sample]] = {k: [] for k in SPLITS}
    for s in samples:
        out[assignment[s.group]].append(s)
    return out


def _deal_strata(
    assignment: dict[str, str],
    groups: dict[str, list[Sample]],
    free: list[str],
    val_fraction: float,
    test_fraction: float,
    rng: np.random.Generator,
) -> None:
    """Assign the ``free`` groups, shuffled within strata of positive-class patterns."""
    strata: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for g in free:
        strata[_positive_pattern(groups[g])].append(g)
    # Deal each stratum out with cumulative rounding so small datasets still get val/test groups.
    carry = {"val": 0.0, "test": 0.0}
    for pattern in sorted(strata):
        gs = strata[pattern]
        order = [gs[i] for i in rng.permutation(len(gs))]
        n = len(order)
        want_val = n * val_fraction + carry["val"]
        want_test = n * test_fraction + carry["test"]
        n_val, n_test = round(want_val), round(want_test)
        if n_val + n_test >= n and n > 0:
            n_test = min(n_test, max(n - 1 - n_val, 0))
            n_val = min(n_val, max(n - 1 - n_test, 0))
        carry["val"], carry["test"] = want_val - n_val, want_test - n_test
        for i, g in enumerate(order):
            assignment[g] = "val" if i < n_val else "test" if i < n_val + n_test else "train"


def _spread_positive_groups(
    assignment: dict[str, str],
    groups: dict[str, list[Sample]],
    free: list[str],
    fractions: dict[str, float],
    rng: np.random.Generator,
) -> None:
    """Move free positive groups into val/test splits that have none of a class (in place).

    Rounding per stratum can leave a split without any positive group of a class when
    the class has few positive patients (3 of 10 at 15 % gives 0.45 groups per split).
    """
    num_classes = len(next(iter(groups.values()))[0].labels) if groups else 0
    positive = {
        g: {k for s in ss for k in range(num_classes) if s.labels[k]} for g, ss in groups.items()
    }
    order = [free[i] for i in rng.permutation(len(free))]
    for k in range(num_classes):
        pos_k = [g for g in groups if k in positive[g]]
        if len(pos_k) < 3:
            continue
        for split in ("val", "test"):
            if fractions[split] <= 0 or any(assignment[g] == split for g in pos_k):
                continue
            count = {sp: sum(assignment[g] == sp for g in pos_k) for sp in SPLITS}
            # Take from the split with the most positive groups of class k; it keeps at least one.
            donors = [
                g
                for g in order
                if k in positive[g] and assignment[g] != split and count[assignment[g]] >= 2
            ]
            if not donors:
                continue
            donor = max(donors, key=lambda g: (count[assignment[g]], assignment[g] == "train"))
            back = _swap_candidate(assignment, positive, order, split)
            if back is not None:
                assignment[back] = assignment[donor]
            assignment[donor] = split


def _swap_candidate(
    assignment: dict[str, str], positive: dict[str, set[int]], order: list[str], split: str
) -> str | None:
    """A free group of ``split`` with no positive at all, to keep the split's size when a positive one arrives."""
    for g in order:
        if assignment[g] == split and not positive[g]:
            return g
    return None


def _positive_pattern(ss: list[Sample]) -> tuple[int, ...]:
    return tuple(int(any(s.labels[k] for s in ss)) for k in range(len(ss[0].labels)))


def cv_folds_of(
    groups: dict[str, list[Sample]], folds: int, seed: int | Sequence[int]
) -> list[list[str]]:
    """The patients of each fold: disjoint, covering every patient, sizes within one.

    Patients are shuffled (seeded) within strata of "has a positive of class k" patterns
    and dealt round-robin, the deal continuing across strata, so each fold gets about
    1/folds of the patients and of the positive patients.
    """
    strata: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for g in sorted(groups):
        strata[_positive_pattern(groups[g])].append(g)
    rng = np.random.default_rng(seed)
    out: list[list[str]] = [[] for _ in range(folds)]
    turn = 0
    for pattern in sorted(strata):
        gs = strata[pattern]
        for i in rng.permutation(len(gs)):
            out[turn % folds].append(gs[i])
            turn += 1
    return out


def cv_split(
    samples: list[Sample], folds: int, fold: int, val_fraction: float, seed: int | Sequence[int]
) -> dict[str, list[Sample]]:
    """Fold ``fold`` of a k-fold cross-validation by patient: its patients are the test split,
    the validation patients (``val_fraction`` of all patients) are drawn from the others
    (stratified, seeded by the seed and the fold), the rest train."""
    if folds < 2 or not 0 <= fold < folds:
        raise ConfigError(
            f"cv.folds={folds}, cv.fold={fold}: need folds >= 2 and 0 <= fold < folds"
        )
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.group].append(s)
    fixed = sorted({g for g, ss in groups.items() if any(s.split for s in ss)})
    if fixed:
        raise ConfigError(
            f"cv.fold={fold}: labels.csv fixes the split of {len(fixed)} patient(s) (e.g. {fixed[0]}, "
            "'split' column); cross-validation deals out every patient itself: empty that column "
            "or drop cv.fold"
        )
    if len(groups) < folds:
        raise ConfigError(
            f"cv.folds={folds}: only {len(groups)} patients; use at most that many folds"
        )
    base = list(seed) if isinstance(seed, Sequence) else [int(seed)]
    test = set(cv_folds_of(groups, folds, base)[fold])
    rest = [s for s in samples if s.group not in test]
    n_rest = len({s.group for s in rest})
    val = min(val_fraction * len(groups) / max(n_rest, 1), 0.99)
    inner = assign_splits(rest, val, 0.0, seed=[*base, fold + 1])
    return {
        "train": inner["train"],
        "val": inner["val"],
        "test": [s for s in samples if s.group in test],
    }
