"""Threshold sweep against ground truth: dataset-level Dice/IoU per class."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from camseg.cam import ThresholdSweep, sweep_thresholds
from camseg.errors import ConfigError

THRESHOLDS = (0.2, 0.5, 0.8)


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cams = torch.rand(4, 3, 10, 12, generator=g)
    labels = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 0]])
    gt = torch.randint(0, 4, (4, 10, 12), generator=g)
    gt[:, 0, :] = 255
    gt[2] = torch.where(gt[2] == 255, 255, 0)  # the negative image has no foreground
    return cams, labels, gt


def _pixel_sets(cams, labels, gt, t: float, k: int) -> tuple[set, set]:
    """Predicted and true pixel coordinates of class k, computed pixel by pixel."""
    c, lab, g = cams.numpy(), labels.numpy(), gt.numpy()
    pred, true = set(), set()
    for b in range(c.shape[0]):
        present = np.flatnonzero(lab[b])
        for i in range(c.shape[2]):
            for j in range(c.shape[3]):
                if g[b, i, j] == 255:
                    continue
                if g[b, i, j] == k:
                    true.add((b, i, j))
                if present.size:
                    best = present[np.argmax(c[b, present, i, j])]
                    if c[b, best, i, j] >= t and best + 1 == k:
                        pred.add((b, i, j))
    return pred, true


def test_dice_and_iou_match_set_arithmetic() -> None:
    cams, labels, gt = _data()
    result = sweep_thresholds(cams, labels, gt, THRESHOLDS, class_names=["a", "b", "c"])
    assert result["classes"] == ["a", "b", "c"]
    for row, t in zip(result["per_threshold"], THRESHOLDS):
        assert row["fg_threshold"] == t
        dices = []
        for k, name in enumerate(["a", "b", "c"], start=1):
            pred, true = _pixel_sets(cams, labels, gt, t, k)
            dice = 2 * len(pred & true) / (len(pred) + len(true))
            iou = len(pred & true) / len(pred | true)
            assert row["dice"][name] == pytest.approx(dice)
            assert row["iou"][name] == pytest.approx(iou)
            dices.append(dice)
        assert row["mean_dice"] == pytest.approx(sum(dices) / 3)
    best = max(result["per_threshold"], key=lambda r: r["mean_dice"])
    assert result["best"]["fg_threshold"] == best["fg_threshold"]


def test_streaming_equals_one_batch() -> None:
    cams, labels, gt = _data(1)
    sweep = ThresholdSweep(THRESHOLDS, num_classes=3, bg_threshold=0.1)
    sweep.update(cams[:1], labels[:1], gt[:1])
    sweep.update(cams[1:], labels[1:], gt[1:])
    assert sweep.compute() == sweep_thresholds(cams, labels, gt, THRESHOLDS, bg_threshold=0.1)


def test_ignore_band_and_background_precision() -> None:
    cams, labels, gt = _data(2)
    bg = 0.3
    result = sweep_thresholds(cams, labels, gt, THRESHOLDS, bg_threshold=bg)
    valid = gt != 255
    present = labels.bool()[:, :, None, None]
    peak = torch.where(present, cams, -1.0).amax(dim=1)
    for row, t in zip(result["per_threshold"], THRESHOLDS):
        low = min(bg, t)
        ignore = (peak >= low) & (peak < t) & valid
        assert row["ignore_fraction"] == pytest.approx(float(ignore.sum() / valid.sum()))
        background = (peak < low) & valid
        correct = background & (gt == 0)
        assert row["bg_precision"] == pytest.approx(float(correct.sum() / background.sum()))
    # The ignore band counts as not-foreground: Dice does not depend on bg_threshold.
    plain = sweep_thresholds(cams, labels, gt, THRESHOLDS)
    assert [r["dice"] for r in plain["per_threshold"]] == [
        r["dice"] for r in result["per_threshold"]
    ]


def test_class_without_ground_truth_or_prediction_scores_one() -> None:
    # camseg.overlap's empty-mask rule, as in quality.json and stage 3 (this sweep said None).
    cams = torch.zeros(1, 2, 4, 4)
    cams[0, 0, :2] = 1.0
    gt = torch.zeros(1, 4, 4, dtype=torch.uint8)
    gt[0, :2] = 1
    result = sweep_thresholds(cams, torch.tensor([[1, 0]]), gt, [0.5])
    row = result["per_threshold"][0]
    assert row["dice"] == {"1": 1.0, "2": 1.0}
    assert row["mean_dice"] == 1.0 and row["mean_iou"] == 1.0
    missed = sweep_thresholds(cams, torch.tensor([[0, 0]]), gt, [0.5])["per_threshold"][0]
    assert missed["dice"] == {"1": 0.0, "2": 1.0} and missed["mean_dice"] == 0.5


def test_bad_inputs_are_refused() -> None:
    cams, labels, gt = _data()
    with pytest.raises(ValueError, match=r"outside 0\.\.3 and 255"):
        sweep_thresholds(cams, labels, torch.full_like(gt, 7), [0.5])
    with pytest.raises(ValueError, match="same size"):
        sweep_thresholds(cams, labels, gt[:, :5], [0.5])
    with pytest.raises(ConfigError, match=r"fg_thresholds=\[1.5\]"):
        ThresholdSweep([1.5], num_classes=3)
    with pytest.raises(ConfigError, match="need 3 names"):
        ThresholdSweep([0.5], num_classes=3, class_names=["a"])
