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
    with pytest.raises(ConfigError, match=r"cv\.folds=5: only 4 patients"):
        cv_split(samples, 5, 0, 0.15, 0)
    fixed = [s if s.group != "P01" else Sample(**{**s.__dict__, "split": "test"}) for s in samples]
    with pytest.raises(ConfigError, match=r"labels\.csv fixes the split of 1 patient"):
        cv_split(fixed, 2, 0, 0.15, 0)


# -- the summary ----------------------------------------------------------------------------


def test_bootstrap_of_identical_patients_has_no_width() -> None:
    from camseg.cv import bootstrap_interval

    counts = np.array([[[8, 2, 2]]] * 5)  # Dice 16/20 each
    boot = bootstrap_interval(counts, samples=200)
    assert boot["dice"] == pytest.approx(0.8)
    assert boot["dice_interval"] == pytest.approx([0.8, 0.8])
    assert boot["patient_dice_interval"] == pytest.approx([0.8, 0.8])


def test_bootstrap_interval_of_two_patients_by_hand() -> None:
    """Resamples of {A, B}: AA (1/4), AB (1/2), BB (1/4): the 2.5 % and 97.5 % points are
    Dice(A only) and Dice(B only); the dataset Dice pools the counts."""
    from camseg.cv import bootstrap_interval

    a, b = [[10, 0, 0]], [[1, 3, 6]]  # Dice 1.0 and 2/11
    boot = bootstrap_interval(np.array([a, b]), samples=4000, seed=1)
    assert boot["dice"] == pytest.approx(22 / (22 + 3 + 6))
    assert boot["dice_interval"] == pytest.approx([2 / 11, 1.0])
    assert boot["patient_dice_mean"] == pytest.approx((1 + 2 / 11) / 2)
    assert boot["patient_dice_interval"] == pytest.approx([2 / 11, 1.0])


def _fake_fold(run: Path, k: int, data: Path, test_groups: list[str], pred_fn) -> None:
    """A fold directory as the pipeline leaves it: manifest, quality, seg metrics, predictions."""
    from PIL import Image

    d = run / f"fold{k}"
    (d / "pseudo").mkdir(parents=True)
    (d / "seg" / "predictions").mkdir(parents=True)
    manifest = {"dataset": {"root": str(data), "classes": ["lesion"]}, "calibration": None}
    (d / "pseudo" / "manifest.json").write_text(json.dumps(manifest))
    (d / "pseudo" / "quality.json").write_text(json.dumps({"dice": 0.5 + 0.1 * k}))
    seg = {"test": {"test/dice": 0.6 + 0.1 * k, "test/iou": 0.5, "test/dice_patient_mean": 0.55}}
    (d / "seg" / "metrics.json").write_text(json.dumps(seg))
    for mask_path in sorted((data / "masks").glob("*.png")):
        if mask_path.stem.split("_")[0] in test_groups:
            gt = np.asarray(Image.open(mask_path))
            Image.fromarray(pred_fn(gt).astype(np.uint8), mode="L").save(
                d / "seg" / "predictions" / mask_path.name
            )


def test_summary_from_fake_fold_directories(kit, tmp_path: Path) -> None:
    from camseg.cv import main

    data = kit.write(tmp_path / "data", kit.tiny_records(patients=4), ["lesion"])
    run = tmp_path / "runs" / "r"
    perfect = lambda gt: gt  # noqa: E731
    empty = lambda gt: np.zeros_like(gt)  # noqa: E731
    _fake_fold(run, 0, data, ["P00", "P01"], perfect)
    _fake_fold(run, 1, data, ["P02", "P03"], empty)
    assert main(["summarize", str(run)]) == 0
    summary = json.loads((run / "cv_summary.json").read_text())
    assert [r["fold"] for r in summary["folds"]] == [0, 1]
    assert summary["mean_sd"]["seg_test_dice"]["mean"] == pytest.approx(0.65)
    assert summary["mean_sd"]["seg_test_dice"]["sd"] == pytest.approx(np.std([0.6, 0.7], ddof=1))
    assert summary["mean_sd"]["pseudo_dice_train"]["mean"] == pytest.approx(0.55)
    boot = summary["bootstrap"]
    assert boot["patients"] == 4
    assert boot["patient_dice"] == {"P00": 1.0, "P01": 1.0, "P02": 0.0, "P03": 0.0}
    assert boot["dice"] == pytest.approx(0.5 * 2 / (0.5 * 2 + 0.5))  # tp = fn: 2tp / (2tp + fn)
    lo, hi = boot["dice_interval"]
    assert 0.0 <= lo < boot["dice"] < hi <= 1.0
    md = (run / "cv_summary.md").read_text()
    assert "| **mean ± sd** |" in md and "bootstrap 95 %" in md
    assert main(["summarize", str(tmp_path / "nothing")]) == 2


def test_a_patient_tested_in_two_folds_is_refused(kit, tmp_path: Path) -> None:
    from camseg.cv import summarize

    data = kit.write(tmp_path / "data", kit.tiny_records(patients=2), ["lesion"])
    run = tmp_path / "runs" / "r"
    _fake_fold(run, 0, data, ["P00"], lambda gt: gt)
    _fake_fold(run, 1, data, ["P00", "P01"], lambda gt: gt)
    with pytest.raises(ValueError, match="patient P00 is a test patient of two folds"):
        summarize(run)


@pytest.mark.slow
def test_cv_multirun_end_to_end(tmp_path: Path) -> None:
    """`camseg -m ... cv.folds=2 cv.fold=0,1`: two fold runs, then cv_summary at the end."""
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "camseg.app",
        "-m",
        "debug=fast",
        f"paths.root_dir={tmp_path}",
        "run_name=cv",
        "data.synthetic.patients=8",
        "data.synthetic.slices_per_patient=4",
        "data.synthetic.size=48",
        "seg.net.encoder_name=resnet18",
        "pseudo.min_positive_coverage=0",
        "cv.folds=2",
        "cv.fold=0,1",
    ]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cross-validation summary written to" in done.stdout
    run = tmp_path / "runs" / "cv"
    for k in (0, 1):
        assert (run / f"fold{k}" / "seg" / "metrics.json").is_file()
    summary = json.loads((run / "cv_summary.json").read_text())
    assert [r["fold"] for r in summary["folds"]] == [0, 1]
    assert all(r["complete"] and r["seg_test_dice"] is not None for r in summary["folds"])
    # every patient with a mask is a test patient of exactly one fold
    assert summary["bootstrap"]["patients"] == 8
