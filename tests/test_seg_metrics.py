"""Segmentation metrics: counts, scores, patient aggregation, detection, accumulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from camseg.errors import ConfigError
from camseg.seg.metrics import SegMetrics, confusion_counts, dice_iou, group_id, group_ids

IGNORE = 255


def _pixels(mask: np.ndarray, value: int) -> set[tuple[int, int]]:
    return {(int(r), int(c)) for r, c in zip(*np.nonzero(mask == value), strict=True)}


def _set_counts(pred: np.ndarray, gt: np.ndarray, k: int) -> tuple[int, int, int]:
    """tp, fp, fn of class k on one image by set arithmetic over non-ignored pixels."""
    evaluated = {(r, c) for r in range(gt.shape[0]) for c in range(gt.shape[1])} - _pixels(
        gt, IGNORE
    )
    p = _pixels(pred, k) & evaluated
    g = _pixels(gt, k)
    return len(p & g), len(p - g), len(g - p)


def _t(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def test_confusion_counts_match_set_arithmetic_on_random_masks() -> None:
    gen = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 4, (5, 7, 9), generator=gen)
    gt = torch.randint(0, 4, (5, 7, 9), generator=gen)
    gt[torch.rand(gt.shape, generator=gen) < 0.2] = IGNORE
    counts = confusion_counts(pred, gt, num_classes=3)
    assert counts.shape == (5, 3, 3) and counts.dtype == torch.int64
    for b in range(5):
        for k in range(1, 4):
            expected = _set_counts(pred[b].numpy(), gt[b].numpy(), k)
            assert tuple(counts[b, k - 1].tolist()) == expected


def test_scores_on_hand_computed_two_class_mask() -> None:
    gt = _t([[1, 1, 0, 2], [1, 0, 0, 2], [0, 0, 0, 0]])
    pred = _t([[1, 0, 0, 2], [1, 1, 0, 0], [0, 0, 0, 2]])
    counts = confusion_counts(pred[None], gt[None], num_classes=2)[0]
    # class 1: gt {(0,0),(0,1),(1,0)}, pred {(0,0),(1,0),(1,1)} -> tp 2, fp 1, fn 1
    # class 2: gt {(0,3),(1,3)}, pred {(0,3),(2,3)} -> tp 1, fp 1, fn 1
    assert counts.tolist() == [[2, 1, 1], [1, 1, 1]]
    s = dice_iou(*counts.unbind(-1))
    assert s.dice.tolist() == pytest.approx([4 / 6, 2 / 4])
    assert s.iou.tolist() == pytest.approx([2 / 4, 1 / 3])
    assert s.sensitivity.tolist() == pytest.approx([2 / 3, 1 / 2])
    assert s.precision.tolist() == pytest.approx([2 / 3, 1 / 2])


def test_scores_empty_cases() -> None:
    zero = _t([[0, 0], [0, 0]])
    one_px = _t([[0, 1], [0, 0]])
    # (empty gt, empty pred), (empty gt, pred 1 px), (gt 1 px, empty pred)
    gt = torch.stack([zero, zero, one_px])
    pred = torch.stack([zero, one_px, zero])
    counts = confusion_counts(pred, gt, num_classes=1)[:, 0]
    assert counts.tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 1]]
    s = dice_iou(*counts.unbind(-1))
    assert s.dice.tolist() == [1.0, 0.0, 0.0]
    assert s.iou.tolist() == [1.0, 0.0, 0.0]
    assert math.isnan(s.sensitivity[0]) and math.isnan(s.sensitivity[1]) and s.sensitivity[2] == 0
    assert math.isnan(s.precision[0]) and s.precision[1] == 0 and math.isnan(s.precision[2])
    assert dice_iou(*counts.unbind(-1), empty_value=0.0).dice[0] == 0.0


def test_ignored_pixels_change_neither_counts_nor_metrics() -> None:
    gen = torch.Generator().manual_seed(1)
    gt = torch.randint(0, 3, (3, 8, 8), generator=gen)
    gt[:, :, :3] = IGNORE
    pred = torch.randint(0, 3, (3, 8, 8), generator=gen)
    other = pred.clone()
    other[gt == IGNORE] = torch.randint(0, 3, (int((gt == IGNORE).sum()),), generator=gen)
    assert not torch.equal(other, pred)
    assert torch.equal(confusion_counts(pred, gt, 2), confusion_counts(other, gt, 2))
    # Ignored columns contribute nothing: same counts as the cropped masks.
    assert torch.equal(
        confusion_counts(pred, gt, 2), confusion_counts(pred[..., 3:], gt[..., 3:], 2)
    )
    results = []
    for p in (pred, other):
        m = SegMetrics(2)
        m.update(p, gt, torch.zeros(3, dtype=torch.int64))
        results.append(m.compute())
    assert results[0] == pytest.approx(results[1], nan_ok=True)


def test_prediction_outside_classes_predicts_nothing() -> None:
    gt = _t([[1, 1], [0, 0]])[None]
    pred = _t([[1, 255], [255, 0]])[None]
    assert confusion_counts(pred, gt, 1)[0, 0].tolist() == [1, 0, 1]


def test_bad_target_value_and_shapes_raise() -> None:
    gt = _t([[0, 3], [0, 0]])[None]
    with pytest.raises(ValueError, match=r"target has value 3; expected 0\.\.2 or 255"):
        confusion_counts(torch.zeros_like(gt), gt, num_classes=2)
    with pytest.raises(ValueError, match="must both be"):
        confusion_counts(torch.zeros(1, 2, 3, dtype=torch.int64), gt, num_classes=3)
    m = SegMetrics(2)
    with pytest.raises(ValueError, match="one id per image"):
        m.update(gt.clamp(max=2), gt.clamp(max=2), torch.zeros(2, dtype=torch.int64))


def test_dataset_level_sums_counts_and_macro_averages() -> None:
    gt = torch.stack([_t([[1, 1, 0], [2, 0, 0]]), _t([[0, 0, 0], [0, 2, 2]])])
    pred = torch.stack([_t([[1, 0, 0], [2, 2, 0]]), _t([[1, 0, 0], [0, 2, 0]])])
    m = SegMetrics(2, class_names=["les", "edema"], prefix="val/")
    m.update(pred, gt, torch.tensor([7, 8]))
    out = m.compute()
    # class les: image0 tp1 fn1; image1 fp1 -> tp1 fp1 fn1
    # class edema: image0 tp1 fp1; image1 tp1 fn1 -> tp2 fp1 fn1
    assert out["val/dice_les"] == pytest.approx(2 / 4)
    assert out["val/dice_edema"] == pytest.approx(4 / 6)
    assert out["val/dice"] == pytest.approx((2 / 4 + 4 / 6) / 2)
    assert out["val/iou"] == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert out["val/sensitivity_edema"] == pytest.approx(2 / 3)
    assert out["val/precision_les"] == pytest.approx(1 / 2)
    # per image Dice: les (2/3, 0), edema (2/3, 2/3)
    assert out["val/dice_image_mean_les"] == pytest.approx(1 / 3)
    assert out["val/dice_image_mean"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert out["val/num_images"] == 2 and out["val/num_patients"] == 2


def test_sensitivity_nan_is_left_out_of_the_macro_mean() -> None:
    gt = _t([[1, 0], [0, 0]])[None]
    pred = _t([[1, 0], [0, 0]])[None]
    out = SegMetrics(2)
    out.update(pred, gt, torch.zeros(1, dtype=torch.int64))
    res = out.compute()
    assert math.isnan(res["sensitivity_class2"]) and res["sensitivity_class1"] == 1.0
    assert res["sensitivity"] == 1.0
    assert res["dice_class2"] == 1.0  # never present, never predicted: the empty convention


def test_per_patient_aggregation_two_patients_three_images() -> None:
    # Patient A: images 0 and 1; patient B: image 2. One class.
    gt = torch.stack([_t([[1, 1], [0, 0]]), _t([[1, 0], [0, 0]]), _t([[0, 0], [0, 0]])])
    pred = torch.stack([_t([[1, 0], [0, 0]]), _t([[1, 1], [1, 0]]), _t([[0, 1], [0, 0]])])
    m = SegMetrics(1, class_names=["nodule"], prefix="test/")
    m.update(pred, gt, group_ids(["A", "A", "B"]))
    out = m.compute()
    # A: image0 tp1 fn1; image1 tp1 fp2 -> tp2 fp2 fn1 -> Dice 4/7. B: fp1 -> Dice 0.
    dice_a, dice_b = 4 / 7, 0.0
    assert out["test/num_patients"] == 2
    assert out["test/dice_patient_mean"] == pytest.approx((dice_a + dice_b) / 2)
    assert out["test/dice_patient_std"] == pytest.approx(float(np.std([dice_a, dice_b])))
    assert out["test/dice_patient_mean_nodule"] == out["test/dice_patient_mean"]
    # Dataset level: tp2 fp3 fn1 -> 2*2 / (2*2 + 3 + 1).
    assert out["test/dice"] == pytest.approx(4 / 8)


def test_detection_sensitivity_and_specificity() -> None:
    z = [[0, 0, 0], [0, 0, 0]]
    images = [  # (gt, pred): class 1 only
        (z, z),  # TN
        (z, [[1, 0, 0], [0, 0, 0]]),  # FP with 1 pixel, TN with min_detect_pixels=2
        ([[1, 0, 0], [0, 0, 0]], [[1, 1, 0], [0, 0, 0]]),  # TP
        ([[1, 1, 0], [0, 0, 0]], z),  # FN
        ([[0, 0, 1], [0, 0, 0]], [[1, 0, 0], [0, 0, 0]]),  # TP at 1 px (no overlap), FN at 2
    ]
    gt = torch.stack([_t(g) for g, _ in images])
    pred = torch.stack([_t(p) for _, p in images])
    ids = torch.arange(5)
    m1 = SegMetrics(1)
    m1.update(pred, gt, ids)
    out = m1.compute()
    assert out["detect_sensitivity"] == pytest.approx(2 / 3)
    assert out["detect_specificity"] == pytest.approx(1 / 2)
    m2 = SegMetrics(1, min_detect_pixels=2)
    m2.update(pred, gt, ids)
    out = m2.compute()
    assert out["detect_sensitivity"] == pytest.approx(1 / 3)
    assert out["detect_specificity"] == pytest.approx(2 / 2)


def test_accumulating_updates_equals_one_update_and_reset_clears() -> None:
    gen = torch.Generator().manual_seed(2)
    gt = torch.randint(0, 3, (6, 10, 10), generator=gen)
    gt[:, 0] = IGNORE
    pred = torch.randint(0, 3, (6, 10, 10), generator=gen)
    groups = torch.tensor([1, 1, 2, 3, 3, 3])
    whole = SegMetrics(2, prefix="val/")
    whole.update(pred, gt, groups)
    parts = SegMetrics(2, prefix="val/")
    parts.update(pred[:1], gt[:1], groups[:1])
    parts.update(pred[1:4], gt[1:4], groups[1:4])
    parts.update(pred[4:], gt[4:], groups[4:])
    expected = whole.compute()
    assert parts.compute() == pytest.approx(expected, nan_ok=True)
    assert set(expected) == set(whole._keys())
    parts.reset()
    parts.update(pred[:2], gt[:2], groups[:2])
    only_two = SegMetrics(2, prefix="val/")
    only_two.update(pred[:2], gt[:2], groups[:2])
    assert parts.compute() == pytest.approx(only_two.compute(), nan_ok=True)
    assert parts.compute()["val/num_images"] == 2


def test_logits_are_accepted_as_prediction() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, 5, generator=gen)
    gt = torch.randint(0, 3, (2, 5, 5), generator=gen)
    a, b = SegMetrics(2), SegMetrics(2)
    a.update(logits, gt, torch.zeros(2, dtype=torch.int64))
    b.update(logits.argmax(1), gt, torch.zeros(2, dtype=torch.int64))
    assert a.compute() == pytest.approx(b.compute(), nan_ok=True)


def test_empty_metric_returns_nan_with_the_same_keys() -> None:
    m = SegMetrics(2, class_names=["a", "b"], prefix="val/")
    with pytest.warns(UserWarning, match="before the ``update``"):
        out = m.compute()
    assert out["val/num_images"] == 0
    assert math.isnan(out["val/dice"]) and math.isnan(out["val/dice_patient_mean_b"])
    m.update(_t([[1]])[None], _t([[1]])[None], torch.zeros(1, dtype=torch.int64))
    assert set(m.compute()) == set(out)


def test_bad_constructor_arguments_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="must be 2 distinct names"):
        SegMetrics(2, class_names=["a"])
    with pytest.raises(ConfigError, match="min_detect_pixels=0"):
        SegMetrics(1, min_detect_pixels=0)


def test_group_id_is_deterministic_across_processes() -> None:
    names = ["patient_001", "patient_002", "P-17", ""]
    ids = [group_id(n) for n in names]
    assert len(set(ids)) == len(ids)
    assert all(0 <= i < 2**63 for i in ids)
    assert group_ids(names).tolist() == ids
    # Pinned: unlike hash(), the id must not change between processes, seeds or releases.
    assert ids[0] == 3657400754391187141


def test_compute_is_fast_after_many_updates() -> None:
    import time

    gen = torch.Generator().manual_seed(4)
    m = SegMetrics(3)
    for i in range(200):
        gt = torch.randint(0, 4, (4, 16, 16), generator=gen)
        m.update(gt.roll(1, dims=-1), gt, torch.full((4,), i // 5))
    start = time.perf_counter()
    out = m.compute()
    assert time.perf_counter() - start < 1.0
    assert out["num_images"] == 800 and out["num_patients"] == 40
