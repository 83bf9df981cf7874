"""Pseudo-mask quality against ground truth, over a sweep of foreground thresholds.

Dataset-level counts (TP/FP/FN summed over all images, then Dice/IoU per class, with
the counting and empty-mask rule of :mod:`camseg.overlap`), streamed batch by batch.
:class:`ThresholdSweep` is a torchmetrics ``Metric`` so that under DDP its counts are
summed across processes before ``compute()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from camseg.cam.base import present_mask
from camseg.cam.policy import threshold_cams
from camseg.constants import BACKGROUND, IGNORE_INDEX
from camseg.errors import ConfigError
from camseg.overlap import confusion_counts, scores


class ThresholdSweep(Metric):
    """Streaming Dice/IoU per class for each foreground threshold.

    For threshold t, a pixel is predicted class k when k is the present class with
    the largest map and that map is >= t (exactly :func:`threshold_cams`); with
    ``bg_threshold`` the ignore band ``[min(bg, t), t)`` is tracked too, but counts
    as not-foreground for Dice/IoU. Ground-truth pixels equal to 255 are skipped.

    Args:
        fg_thresholds: thresholds to evaluate, in [0,1].
        num_classes: K (ground truth holds 0..K).
        bg_threshold: optional, to report the ignore fraction and background precision.
        class_names: names for the per-class entries of :meth:`compute` (default
            ``"1".."K"``).

    ``counts[t, k]`` holds tp, fp, fn of class k+1; ``pixels[t]`` the ignore-predicted,
    background-predicted, correctly background-predicted and valid pixels.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    counts: torch.Tensor
    pixels: torch.Tensor

    def __init__(
        self,
        fg_thresholds: Sequence[float],
        num_classes: int,
        bg_threshold: float | None = None,
        class_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        thresholds = [float(t) for t in fg_thresholds]
        if not thresholds or any(not 0.0 <= t <= 1.0 for t in thresholds):
            raise ConfigError(f"sweep fg_thresholds={thresholds}: need at least one, all in [0, 1]")
        if bg_threshold is not None and not 0.0 <= bg_threshold <= 1.0:
            raise ConfigError(f"sweep bg_threshold={bg_threshold}: must be in [0, 1]")
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(
                f"sweep class_names={list(class_names)}: need {num_classes} names, one per class"
            )
        self.fg_thresholds = thresholds
        self.num_classes = num_classes
        self.bg_threshold = bg_threshold
        self.class_names = (
            [str(c) for c in class_names]
            if class_names is not None
            else [str(k) for k in range(1, num_classes + 1)]
        )
        for state, shape in (
            ("counts", (len(thresholds), num_classes, 3)),
            ("pixels", (len(thresholds), 4)),
        ):
            self.add_state(state, torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, cams: torch.Tensor, labels: torch.Tensor, gt: torch.Tensor) -> None:
        """Add one batch: cams (B,K,H,W) in [0,1], labels (B,K), gt (B,H,W) in 0..K or 255."""
        k = self.num_classes
        if cams.ndim != 4 or cams.shape[1] != k or gt.shape != (cams.shape[0], *cams.shape[-2:]):
            raise ValueError(
                f"ThresholdSweep.update: cams {tuple(cams.shape)} must be (B,{k},H,W) "
                f"and gt {tuple(gt.shape)} (B,H,W) of the same size"
            )
        device = self.counts.device
        present = present_mask(labels, cams.shape[0]).to(device)
        gt = gt.to(device=device, dtype=torch.long)
        valid = gt != IGNORE_INDEX
        if bool(((gt < 0) | (gt > k)).logical_and(valid).any()):  # one sync per batch
            raise ValueError(
                f"ThresholdSweep.update: ground truth has values outside 0..{k} and 255"
            )
        cams = cams.to(device)
        for i, t in enumerate(self.fg_thresholds):
            bg = t if self.bg_threshold is None else min(self.bg_threshold, t)
            pred = threshold_cams(cams, present, t, bg)
            self.counts[i] += confusion_counts(pred, gt, k).sum(dim=0)
            background = (pred == BACKGROUND) & valid
            ignored = (pred == IGNORE_INDEX) & valid
            self.pixels[i] += torch.stack(
                [ignored.sum(), background.sum(), (background & (gt == 0)).sum(), valid.sum()]
            )

    def compute(self) -> dict[str, Any]:
        """JSON-ready results: per threshold, per-class and mean Dice/IoU, and the best t."""
        overlap = scores(self.counts.cpu())  # (T,K) each
        pixels = self.pixels.cpu().tolist()
        rows: list[dict[str, Any]] = []
        for i, t in enumerate(self.fg_thresholds):
            ignored, background, correct, valid = pixels[i]
            rows.append(
                {
                    "fg_threshold": t,
                    "dice": dict(zip(self.class_names, overlap.dice[i].tolist())),
                    "iou": dict(zip(self.class_names, overlap.iou[i].tolist())),
                    "mean_dice": float(overlap.dice[i].mean()),
                    "mean_iou": float(overlap.iou[i].mean()),
                    # None rather than NaN where nothing was counted: JSON-safe.
                    "ignore_fraction": ignored / valid if valid else None,
                    "bg_precision": correct / background if background else None,
                }
            )
        best = max(rows, key=lambda r: r["mean_dice"])
        return {
            "fg_thresholds": list(self.fg_thresholds),
            "bg_threshold": self.bg_threshold,
            "classes": list(self.class_names),
            "per_threshold": rows,
            "best": {"fg_threshold": best["fg_threshold"], "mean_dice": best["mean_dice"]},
        }


def sweep_thresholds(
    cams: torch.Tensor,
    labels: torch.Tensor,
    gt_masks: torch.Tensor,
    fg_thresholds: Sequence[float],
    bg_threshold: float | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One-shot :class:`ThresholdSweep` over a single batch (see there for the output)."""
    sweep = ThresholdSweep(fg_thresholds, cams.shape[1], bg_threshold, class_names).to(cams.device)
    sweep.update(cams, labels, gt_masks)
    return sweep.compute()
