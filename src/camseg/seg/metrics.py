"""Segmentation metrics against ground-truth masks: Dice, IoU, sensitivity, precision.

Conventions (shared with the losses): masks are ``(B,H,W)`` int64, 0 = background,
``1..K`` = foreground classes, ``ignore_index`` (255) = not evaluated. Metrics are reported
for the foreground classes only.

Counting and the empty-mask rule: :mod:`camseg.overlap`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from camseg.constants import IGNORE_INDEX
from camseg.errors import ConfigError
from camseg.overlap import confusion_counts, dice_iou


def group_id(name: str) -> int:
    """A deterministic int64 id for a patient / group name (the same in every process).

    63 bits of BLAKE2b, so that ids are non-negative int64 and collisions between a few
    thousand patients are practically impossible (crc32 would give 32 bits).
    """
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def group_ids(names: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
    """``group_id`` of each name, as a ``(B,)`` int64 tensor for ``SegMetrics.update``."""
    return torch.tensor([group_id(n) for n in names], dtype=torch.int64, device=device)


class SegMetrics(Metric):
    """Dataset-, class-, patient- and image-level segmentation metrics (DDP-safe).

    ``update`` stores per-image counts and group ids (list states, concatenated across
    processes); ``compute`` derives everything from them on whatever device they are on.

    Keys returned by ``compute`` (each prefixed with ``prefix``), macro-averaged over the
    K classes where a per-class variant ``<key>_<classname>`` exists:

    - ``dice``, ``iou``, ``sensitivity``, ``precision``: counts summed over all images.
    - ``dice_image_mean``: mean of per-image Dice.
    - ``dice_patient_mean``, ``dice_patient_std``: counts summed per patient (group), Dice per
      patient and class, then mean and population std over patients.
    - ``detect_sensitivity``, ``detect_specificity``: image-level detection. An image is
      positive for a class if its ground truth has a pixel of it, predicted positive if the
      prediction has at least ``min_detect_pixels`` of it.
    - ``num_images``, ``num_patients`` (no class variants).

    Args:
        num_classes: K, the number of foreground classes.
        class_names: K names for the per-class keys (default ``class1``, ``class2``, ...).
        prefix: prepended to every key, e.g. ``"val/"``.
        ignore_index: target value that is not evaluated.
        min_detect_pixels: predicted pixels needed to call an image positive.
        empty_value: Dice / IoU where ground truth and prediction are both empty.
        **kwargs: passed to ``torchmetrics.Metric`` (e.g. ``compute_on_cpu=True`` to keep the
            per-image states off the GPU).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    image_counts: list[torch.Tensor]
    image_groups: list[torch.Tensor]

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        prefix: str = "",
        ignore_index: int = IGNORE_INDEX,
        min_detect_pixels: int = 1,
        empty_value: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ConfigError(f"SegMetrics: num_classes={num_classes}; need at least 1 class")
        names = list(class_names) if class_names is not None else None
        if names is None:
            names = [f"class{k}" for k in range(1, num_classes + 1)]
        if len(names) != num_classes or len(set(names)) != num_classes:
            raise ConfigError(
                f"SegMetrics: class_names {names} must be {num_classes} distinct names, "
                "one per foreground class"
            )
        if min_detect_pixels < 1:
            raise ConfigError(f"SegMetrics: min_detect_pixels={min_detect_pixels}; must be >= 1")
        self.num_classes = num_classes
        self.class_names = names
        self.prefix = prefix
        self.ignore_index = ignore_index
        self.min_detect_pixels = min_detect_pixels
        self.empty_value = empty_value
        self.add_state("image_counts", default=[], dist_reduce_fx="cat")
        self.add_state("image_groups", default=[], dist_reduce_fx="cat")

    def update(self, pred: torch.Tensor, target: torch.Tensor, group_ids: torch.Tensor) -> None:
        """Add a batch.

        Args:
            pred: ``(B,H,W)`` predicted labels, or ``(B,K+1,H,W)`` logits (argmax taken).
            target: ``(B,H,W)`` ground-truth labels (``ignore_index`` not evaluated).
            group_ids: ``(B,)`` int64 patient ids, e.g. from ``group_ids(names)``.
        """
        if pred.ndim == target.ndim + 1:
            pred = pred.argmax(dim=1)
        if group_ids.shape != (target.shape[0],):
            raise ValueError(
                f"SegMetrics.update: group_ids {tuple(group_ids.shape)} must be "
                f"({target.shape[0]},), one id per image"
            )
        counts = confusion_counts(pred, target, self.num_classes, self.ignore_index)
        self.image_counts.append(counts)
        self.image_groups.append(group_ids.to(device=counts.device, dtype=torch.int64))

    def _keys(self) -> list[str]:
        base = ["dice", "iou", "sensitivity", "precision", "dice_image_mean"]
        base += [
            "dice_patient_mean",
            "dice_patient_std",
            "detect_sensitivity",
            "detect_specificity",
        ]
        keys = [f"{self.prefix}{k}" for k in ("num_images", "num_patients", *base)]
        keys += [f"{self.prefix}{k}_{c}" for k in base for c in self.class_names]
        return keys

    def compute(self) -> dict[str, float]:
        """All metrics as Python floats; NaN everywhere (counts 0) if nothing was added."""
        # After a DDP sync the list states arrive concatenated into one tensor.
        empty = (
            self.image_counts.numel() == 0
            if isinstance(self.image_counts, torch.Tensor)
            else len(self.image_counts) == 0
        )
        if empty:
            out = dict.fromkeys(self._keys(), float("nan"))
            out[f"{self.prefix}num_images"] = 0.0
            out[f"{self.prefix}num_patients"] = 0.0
            return out
        counts = dim_zero_cat(self.image_counts).reshape(-1, self.num_classes, 3)
        groups = dim_zero_cat(self.image_groups).reshape(-1)
        tp, fp, fn = counts.unbind(-1)

        per_class: dict[str, torch.Tensor] = {}  # name -> (K,)
        dataset = dice_iou(tp.sum(0), fp.sum(0), fn.sum(0), self.empty_value)
        per_class.update(dataset._asdict())
        per_class["dice_image_mean"] = dice_iou(tp, fp, fn, self.empty_value).dice.mean(0)

        _, patient = torch.unique(groups, return_inverse=True)
        num_patients = int(patient.max()) + 1
        patient_counts = torch.zeros(
            num_patients, self.num_classes, 3, dtype=counts.dtype, device=counts.device
        ).index_add_(0, patient, counts)
        ptp, pfp, pfn = patient_counts.unbind(-1)
        pdice = dice_iou(ptp, pfp, pfn, self.empty_value).dice  # (P,K)
        per_class["dice_patient_mean"] = pdice.mean(0)
        per_class["dice_patient_std"] = pdice.std(0, correction=0)

        gt_pos = (tp + fn) > 0
        pred_pos = (tp + fp) >= self.min_detect_pixels
        per_class["detect_sensitivity"] = (gt_pos & pred_pos).sum(0) / gt_pos.sum(0)
        per_class["detect_specificity"] = (~gt_pos & ~pred_pos).sum(0) / (~gt_pos).sum(0)

        stacked = torch.stack([v.to(torch.float64) for v in per_class.values()])  # (M,K)
        # One device-to-host copy: column 0 the macro mean, then one column per class.
        table = torch.cat([stacked.nanmean(dim=1).unsqueeze(1), stacked], dim=1).cpu().tolist()
        out = {
            f"{self.prefix}num_images": float(counts.shape[0]),
            f"{self.prefix}num_patients": float(num_patients),
        }
        for key, row in zip(per_class, table, strict=True):
            out[f"{self.prefix}{key}"] = row[0]
        for key, row in zip(per_class, table, strict=True):
            for name, value in zip(self.class_names, row[1:], strict=True):
                out[f"{self.prefix}{key}_{name}"] = value
        return out


# Undefined by convention when there is nothing to divide by (see the module docstring):
# NaN there is not a failure, and "predicts nothing" is reported by the detection check.
_NAN_BY_CONVENTION = ("sensitivity", "precision", "detect_sensitivity", "detect_specificity")


def output_warnings(
    evaluations: dict[str, dict[str, float]],
    class_names: Sequence[str],
    train_positives: dict[str, dict[str, int]] | None = None,
) -> list[str]:
    """Loud-failure checks on a trained segmenter's metrics; one sentence per finding.

    Args:
        evaluations: split name (``val``, ``test``) -> the ``SegMetrics`` keys logged for it
            (``<split>/detect_sensitivity_<class>`` etc.); empty where the split has no
            ground truth.
        class_names: the K foreground classes.
        train_positives: class -> ``{"positives": n, "with_foreground": m}``, the training
            images labelled positive and how many of them the segmenter gives any pixel of
            the class; judged for a class whose validation has no positive with ground truth.

    Returns:
        Warnings: a class predicted on none of a split's positive images, a metric that is
        NaN or infinite (beyond the conventions above).
    """
    out: list[str] = []
    for split, metrics in evaluations.items():
        for name in class_names:
            v = metrics.get(f"{split}/detect_sensitivity_{name}")
            if v is not None and v == 0.0:
                out.append(
                    f"the segmenter predicts no '{name}' on any {split} image whose ground truth has "
                    f"it ({split}/detect_sensitivity_{name} = 0)"
                )
        bad = sorted(
            k
            for k, v in metrics.items()
            if not math.isfinite(v)
            and not any(k.split("/", 1)[-1].startswith(p) for p in _NAN_BY_CONVENTION)
        )
        if bad:
            out.append(f"{split} metrics are NaN or infinite: {', '.join(bad)}")
    val = evaluations.get("val", {})
    for name, tally in (train_positives or {}).items():
        v = val.get(f"val/detect_sensitivity_{name}")
        if v is not None and math.isfinite(v):
            continue  # validation with ground truth has judged this class
        if tally["positives"] and not tally["with_foreground"]:
            out.append(
                f"the segmenter predicts no '{name}' on any of the {tally['positives']} training "
                "images labelled positive (no validation ground truth to judge it on)"
            )
    return out
