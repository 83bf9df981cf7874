"""Pseudo-mask quality against ground truth, over a sweep of foreground thresholds.

Dataset-level counts (TP/FP/FN summed over all images, then Dice/IoU per class),
streamed batch by batch. :class:`ThresholdSweep` is a torchmetrics ``Metric`` so
that under DDP its counts are summed across processes before ``compute()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from camseg.cam.base import present_mask
from camseg.cam.policy import threshold_cams
from camseg.constants import IGNORE_INDEX
from camseg.errors import ConfigError


def _ratio(num: torch.Tensor, den: torch.Tensor) -> list[float | None]:
    """num / den element-wise as floats, None where den == 0 (JSON-safe, no NaN)."""
    return [None if d == 0 else float(n / d) for n, d in zip(num.tolist(), den.tolist())]


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

    ``confusion[t, p, g]`` counts pixels predicted p (0 bg, 1..K, K+1 ignore) with
    ground truth g (0..K).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    confusion: torch.Tensor

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
        shape = (len(thresholds), num_classes + 2, num_classes + 1)
        self.add_state(
            "confusion", default=torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, cams: torch.Tensor, labels: torch.Tensor, gt: torch.Tensor) -> None:
        """Add one batch: cams (B,K,H,W) in [0,1], labels (B,K), gt (B,H,W) in 0..K or 255."""
        k = self.num_classes
        if cams.ndim != 4 or cams.shape[1] != k or gt.shape != (cams.shape[0], *cams.shape[-2:]):
            raise ValueError(
                f"ThresholdSweep.update: cams {tuple(cams.shape)} must be (B,{k},H,W) "
                f"and gt {tuple(gt.shape)} (B,H,W) of the same size"
            )
        device = self.confusion.device
        present = present_mask(labels, cams.shape[0]).to(device)
        gt = gt.to(device=device, dtype=torch.long)
        valid = gt != IGNORE_INDEX
        if bool(((gt < 0) | (gt > k)).logical_and(valid).any()):  # one sync per batch
            raise ValueError(
                f"ThresholdSweep.update: ground truth has values outside 0..{k} and 255"
            )
        cams = cams.to(device)
        cells = (k + 2) * (k + 1)
        dump = torch.full_like(gt, cells)
        for i, t in enumerate(self.fg_thresholds):
            bg = t if self.bg_threshold is None else min(self.bg_threshold, t)
            pred = threshold_cams(cams, present, t, bg).long()
            pred = torch.where(pred == IGNORE_INDEX, k + 1, pred)
            index = torch.where(valid, pred * (k + 1) + gt, dump).flatten()
            # index_add_ rather than bincount: bincount syncs with the host on CUDA.
            counts = torch.zeros(cells + 1, dtype=torch.long, device=device)
            counts.index_add_(0, index, torch.ones_like(index))
            self.confusion[i] += counts[:cells].view(k + 2, k + 1)

    def compute(self) -> dict[str, Any]:
        """JSON-ready results: per threshold, per-class and mean Dice/IoU, and the best t.

        Dice/IoU of a class with neither ground truth nor prediction is None and is
        left out of the means.
        """
        k = self.num_classes
        conf = self.confusion.double().cpu()
        rows: list[dict[str, Any]] = []
        for i, t in enumerate(self.fg_thresholds):
            c = conf[i]
            tp = c.diagonal()[1 : k + 1]
            predicted = c[1 : k + 1].sum(dim=1)
            actual = c[:, 1:].sum(dim=0)
            dice = _ratio(2 * tp, predicted + actual)
            iou = _ratio(tp, predicted + actual - tp)
            dice_ok = [d for d in dice if d is not None]
            iou_ok = [v for v in iou if v is not None]
            total = c.sum()
            rows.append(
                {
                    "fg_threshold": t,
                    "dice": dict(zip(self.class_names, dice)),
                    "iou": dict(zip(self.class_names, iou)),
                    "mean_dice": sum(dice_ok) / len(dice_ok) if dice_ok else None,
                    "mean_iou": sum(iou_ok) / len(iou_ok) if iou_ok else None,
                    "ignore_fraction": _ratio(c[k + 1].sum()[None], total[None])[0],
                    "bg_precision": _ratio(c[0, 0][None], c[0].sum()[None])[0],
                }
            )
        scored = [(r["mean_dice"], r["fg_threshold"]) for r in rows if r["mean_dice"] is not None]
        best = max(scored, key=lambda pair: pair[0]) if scored else None
        return {
            "fg_thresholds": list(self.fg_thresholds),
            "bg_threshold": self.bg_threshold,
            "classes": list(self.class_names),
            "per_threshold": rows,
            "best": None if best is None else {"fg_threshold": best[1], "mean_dice": best[0]},
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
