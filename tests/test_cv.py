"""Cross-validation by patient: the folds, the per-fold run directories and the summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from camseg.data.folder import Sample
from camseg.data.splits import assign_splits, cv_split
from camseg.errors import ConfigError


def _samples(patients: int = 23, positive_every: int = 3) -> list[Sample]:
    out = []
    for p in range(patients):
        for s in range(3):
            positive = p % positive_every == 0 and s == 1
            out.append(
                Sample(
                    id=f"P{p:02d}_{s}",
                    image=f"images/P{p:02d}_{s}.png",
                    mask=None,
                    group=f"P{p:02d}",
                    split=None,
                    slice=s,
                    labels=(int(positive),),
                )
            )
    return out


def _groups(samples: list[Sample]) -> set[str]:
    return {s.group for s in samples}


@pytest.mark.parametrize("folds", [2, 5])
def test_folds_are_disjoint_test_sets_covering_every_patient(folds: int) -> None:
    samples = _samples()
    tests = []
    for k in range(folds):
        split = cv_split(samples, folds, k, val_fraction=0.15, seed=0)
        train, val, test = (_groups(split[n]) for n in ("train", "val", "test"))
        assert not (train & val) and not (train & test) and not (val & test)
        assert train | val | test == _groups(samples)
        assert len(val) == round(0.15 * 23)
        tests.append(test)
        # positives spread over the folds: each test fold has about 1/folds of them
        positive = {s.group for s in split["test"] if any(s.labels)}
        assert abs(len(positive) - 8 / folds) <= 1
    assert sorted(g for t in tests for g in t) == sorted(_groups(samples))
    sizes = [len(t) for t in tests]
    assert max(sizes) - min(sizes) <= 1


def test_folds_are_deterministic_from_the_seed_and_move_with_it() -> None:
    samples = _samples()
    a = [cv_split(samples, 5, k, 0.15, seed=0) for k in range(5)]
    b = [cv_split(samples, 5, k, 0.15, seed=0) for k in range(5)]
    c = [cv_split(samples, 5, k, 0.15, seed=1) for k in range(5)]
    ids = lambda xs: [[s.id for s in x[n]] for x in xs for n in ("train", "val", "test")]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)
    # assign_splits routes cv_fold to the folds; without it the split is as before
    assert ids([assign_splits(samples, 0.15, 0.15, 0, cv_folds=5, cv_fold=2)]) == ids([a[2]])
    plain = assign_splits(samples, 0.15, 0.15, 0)
    assert len(_groups(plain["test"])) == round(0.15 * 23)


def test_bad_folds_are_config_errors() -> None:
    samples = _samples(patients=4)
    with pytest.raises(ConfigError, match="need folds >= 2 and 0 <= fold < folds"):
        cv_split(samples, 5, 5, 0.15, 0)
    with pytest.raises(ConfigError, match="cv.folds=5: only 4 patients"):
        cv_split(samples, 5, 0, 0.15, 0)
    fixed = [s if s.group != "P01" else Sample(**{**s.__dict__, "split": "test"}) for s in samples]
    with pytest.raises(ConfigError, match="labels.csv fixes the split of 1 patient"):
        cv_split(fixed, 2, 0, 0.15, 0)
