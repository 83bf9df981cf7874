"""Patient-level splits: groups never straddle splits; explicit splits, seeds, fractions, positives."""

from __future__ import annotations

import math

import numpy as np
import pytest

from camseg.constants import SPLITS
from camseg.data.folder import Sample
from camseg.data.splits import assign_splits
from camseg.errors import ConfigError


def make_samples(
    groups: int,
    seed: int = 0,
    classes: int = 1,
    positive_groups: dict[int, list[int]] | None = None,
    splits: dict[int, str] | None = None,
) -> list[Sample]:
    """``groups`` patients with 1-6 slices each, rows interleaved across patients.

    Args:
        positive_groups: class -> the groups with a positive slice of it; default random.
        splits: group -> explicit split value of all its rows.
    """
    rng = np.random.default_rng(seed)
    if positive_groups is None:
        positive_groups = {
            k: [g for g in range(groups) if rng.random() < 0.4] for k in range(classes)
        }
    rows = []
    for g in range(groups):
        n = int(rng.integers(1, 7))
        for s in range(n):
            labels = tuple(int(g in positive_groups.get(k, []) and s == 0) for k in range(classes))
            rows.append((rng.random(), g, s, labels))
    rows.sort()  # shuffled row order: a group's slices are not contiguous
    split_of = splits or {}
    return [
        Sample(f"p{g}_{s}", f"images/p{g}_{s}.png", None, f"p{g}", split_of.get(g), s, labels)
        for _, g, s, labels in rows
    ]


def group_sets(out: dict[str, list[Sample]]) -> dict[str, set[str]]:
    return {k: {s.group for s in v} for k, v in out.items()}


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_groups_never_straddle_splits_and_rows_are_kept(seed: int) -> None:
    samples = make_samples(80, seed=seed, classes=2)
    out = assign_splits(samples, 0.2, 0.15, seed=seed)
    sets = group_sets(out)
    assert set(out) == set(SPLITS)
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not sets[a] & sets[b], f"{a}/{b} share groups"
    # Every row exactly once, in the original order inside each split.
    assert sorted(s.id for v in out.values() for s in v) == sorted(s.id for s in samples)
    position = {s.id: i for i, s in enumerate(samples)}
    for v in out.values():
        assert [position[s.id] for s in v] == sorted(position[s.id] for s in v)


def test_deterministic_for_a_seed_and_seed_matters() -> None:
    samples = make_samples(50, seed=7)
    first = assign_splits(samples, 0.15, 0.15, seed=3)
    again = assign_splits(list(samples), 0.15, 0.15, seed=3)
    assert {k: [s.id for s in v] for k, v in first.items()} == {
        k: [s.id for s in v] for k, v in again.items()
    }
    others = [group_sets(assign_splits(samples, 0.15, 0.15, seed=s)) for s in range(4, 8)]
    assert any(o != group_sets(first) for o in others)


@pytest.mark.parametrize(("val", "test"), [(0.15, 0.15), (0.2, 0.1), (0.3, 0.0), (0.0, 0.25)])
def test_fractions_are_roughly_respected(val: float, test: float) -> None:
    n = 100
    sets = group_sets(assign_splits(make_samples(n, seed=11, classes=2), val, test, seed=0))
    # Rounding happens per label stratum (at most four here): a couple of groups of slack.
    assert abs(len(sets["val"]) - n * val) <= 3
    assert abs(len(sets["test"]) - n * test) <= 3
    assert len(sets["train"]) + len(sets["val"]) + len(sets["test"]) == n
    if val == 0:
        assert not sets["val"]
    if test == 0:
        assert not sets["test"]


def test_explicit_split_column_is_honoured() -> None:
    fixed = {0: "test", 1: "test", 2: "val", 3: "train", 4: "val"}
    samples = make_samples(30, seed=2, splits=fixed)
    out = assign_splits(samples, 0.2, 0.2, seed=5)
    for split, members in out.items():
        for s in members:
            if s.split is not None:
                assert s.split == split, f"{s.id} has split={s.split} but was put in {split}"
    sets = group_sets(out)
    for g, split in fixed.items():
        assert f"p{g}" in sets[split]
    # Groups with a split value take no part in the dealing: the others still get val/test shares.
    free_val = sets["val"] - {f"p{g}" for g in fixed}
    assert free_val


def test_all_splits_explicit() -> None:
    fixed = {g: SPLITS[g % 3] for g in range(9)}
    out = assign_splits(make_samples(9, seed=4, splits=fixed), 0.5, 0.4, seed=0)
    assert group_sets(out) == {sp: {f"p{g}" for g, s in fixed.items() if s == sp} for sp in SPLITS}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("groups", "positives"), [(10, 3), (20, 3), (12, 5), (40, 4)])
def test_positive_groups_reach_val_and_test(groups: int, positives: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pos = sorted(rng.choice(groups, size=positives, replace=False).tolist())
    samples = make_samples(groups, seed=seed, positive_groups={0: pos})
    out = assign_splits(samples, 0.15, 0.15, seed=seed)
    for split in SPLITS:
        assert any(s.labels[0] for s in out[split]), (
            f"no positive group in {split} (positives {pos})"
        )
    # Sizes stay close to the fractions: a positive that moves in swaps with a negative.
    sets = group_sets(out)
    for split, frac in (("val", 0.15), ("test", 0.15)):
        assert len(sets[split]) <= max(1, math.ceil(groups * frac)) + 1


def test_positives_of_each_class_reach_val_and_test() -> None:
    # Class 1 is rare (3 groups), class 0 common: both must be seen in val and test.
    samples = make_samples(
        30, seed=9, classes=2, positive_groups={0: list(range(0, 30, 2)), 1: [3, 17, 25]}
    )
    out = assign_splits(samples, 0.15, 0.15, seed=1)
    for split in SPLITS:
        for k in range(2):
            assert any(s.labels[k] for s in out[split]), f"class {k} missing from {split}"


def test_too_few_positive_groups_stay_in_train_when_fraction_allows() -> None:
    # Two positive groups cannot cover three splits: none is forced out of train.
    samples = make_samples(10, seed=3, positive_groups={0: [2, 7]})
    out = assign_splits(samples, 0.15, 0.15, seed=0)
    assert any(s.labels[0] for s in out["train"])


def test_tiny_datasets_do_not_fail() -> None:
    for groups in (1, 2, 3):
        out = assign_splits(make_samples(groups, seed=groups), 0.15, 0.15, seed=0)
        assert sum(len(v) for v in out.values()) == len(make_samples(groups, seed=groups))
        assert out["train"], "train must keep at least one group"


@pytest.mark.parametrize(
    ("val", "test"),
    [(-0.1, 0.1), (0.1, -0.01), (1.0, 0.0), (0.6, 0.4), (0.5, 0.7), (float("nan"), 0.1)],
)
def test_bad_fractions_raise_config_error(val: float, test: float) -> None:
    with pytest.raises(
        ConfigError,
        match=r"data\.val_fraction=.*data\.test_fraction=.*each in \[0,1\) and their sum below 1",
    ):
        assign_splits(make_samples(5), val, test)
