"""Case-by-case evaluation of the segmenter's test predictions, for people to audit.

Stage 3 writes one prediction per test image (``seg/predictions/<id>.png``, full size).
This module reads them back beside the ground truth and computes, per image and class:

- Dice, IoU and the pixel areas (counted by :mod:`camseg.overlap`, its empty-mask rule);
- the 95th-percentile Hausdorff distance (HD95) and the surface Dice at a tolerance, both
  from the boundary distances of torchmetrics (``edge_surface_distance``); HD95 follows
  MONAI's convention: the larger of the two directed 95th percentiles;
- per-lesion detection: each connected ground-truth component (8-connectivity) is hit when
  the prediction touches it, missed otherwise; each predicted component touching no
  ground truth is a false lesion;
- the image's error type: ``tp`` (lesion present and predicted), ``fn`` (present, nothing
  predicted), ``fp`` (no lesion, something predicted), ``tn``.

Then per patient (counts summed over the patient's slices; detection at the patient
level: a patient is positive when any slice has ground truth, predicted positive when any
slice is), and a slice-level ROC of detection scored by the predicted area.

Distances are in pixels of the stored image; the surface-Dice tolerance is relative to the
image: ``surface_tolerance`` × the image's longer side (default 1 %, at least one pixel).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from camseg.constants import IGNORE_INDEX
from camseg.data.folder import DatasetIndex, Sample
from camseg.overlap import confusion_counts, scores
from camseg.utils.io import read_mask

CASES_JSON = "cases.json"  # test patients (predictions/)
VAL_CASES_JSON = "cases_val.json"  # validation patients (predictions_val/)
VAL_PREDICTIONS = "predictions_val"
ERROR_TYPES = ("fn", "fp", "tp", "tn")
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Surface:
    """Boundary agreement of one class in one image (pixels)."""

    hd95: float  # NaN when both masks are empty, inf when exactly one is
    surface_dice: float  # 1.0 when both are empty, 0.0 when exactly one is


def spread_over_patients(samples: Sequence[Any], n: int) -> list[str]:
    """Ids of ``n`` samples dealt round-robin over the patients (in their first-seen order),
    lesion slices (any positive label) first within each patient: pictures that show every
    patient rather than the first patient's slices."""
    by_patient: dict[str, list[Any]] = {}
    for s in samples:
        by_patient.setdefault(s.group, []).append(s)
    queues = [sorted(ss, key=lambda s: not any(s.labels)) for ss in by_patient.values()]
    out: list[str] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0).id)
    return out


def surface_metrics(pred: np.ndarray, target: np.ndarray, tolerance: float) -> Surface:
    """HD95 and surface Dice of two boolean masks of one image.

    Boundary distances come from ``torchmetrics``' ``edge_surface_distance`` (euclidean,
    unit spacing). Surface Dice counts boundary pixels of either mask whose distance to the
    other mask's boundary is at most ``tolerance``, over all boundary pixels.
    """
    p_any, t_any = bool(pred.any()), bool(target.any())
    if not p_any and not t_any:
        return Surface(float("nan"), 1.0)
    if p_any != t_any:
        return Surface(float("inf"), 0.0)
    from torchmetrics.functional.segmentation.utils import edge_surface_distance, mask_edges

    p_edges, t_edges = mask_edges(torch.from_numpy(pred), torch.from_numpy(target))[:2]
    d_pt, d_tp = edge_surface_distance(p_edges, t_edges, symmetric=True)
    d_pt, d_tp = d_pt.double(), d_tp.double()
    hd95 = max(float(torch.quantile(d_pt, 0.95)), float(torch.quantile(d_tp, 0.95)))
    close = int((d_pt <= tolerance).sum()) + int((d_tp <= tolerance).sum())
    return Surface(hd95, close / max(1, d_pt.numel() + d_tp.numel()))


def lesion_counts(pred: np.ndarray, target: np.ndarray) -> dict[str, int]:
    """Connected ground-truth lesions hit / missed and predicted components that are false."""
    gt_lab, n_gt = ndimage.label(target, structure=_EIGHT)
    pr_lab, n_pr = ndimage.label(pred, structure=_EIGHT)
    hit = len(set(np.unique(gt_lab[pred & (gt_lab > 0)]).tolist())) if n_gt else 0
    touched = set(np.unique(pr_lab[target & (pr_lab > 0)]).tolist()) if n_pr else set()
    return {
        "lesions": int(n_gt),
        "hit": hit,
        "missed": int(n_gt) - hit,
        "false": int(n_pr) - len(touched),
    }


def error_type(gt_positive: bool, pred_positive: bool) -> str:
    if gt_positive:
        return "tp" if pred_positive else "fn"
    return "fp" if pred_positive else "tn"


def evaluate_image(
    pred: np.ndarray,
    target: np.ndarray,
    num_classes: int,
    min_detect_pixels: int = 1,
    surface_tolerance: float = 0.01,
) -> dict[str, Any]:
    """Every per-image figure for classes ``1..K`` (see the module docstring)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {target.shape} differ in size")
    counts = confusion_counts(
        torch.from_numpy(pred.astype(np.int64))[None],
        torch.from_numpy(target.astype(np.int64))[None],
        num_classes,
    )[0]
    sc = scores(counts)
    tol = max(1.0, surface_tolerance * max(target.shape))
    valid = target != IGNORE_INDEX
    classes = []
    for k in range(1, num_classes + 1):
        p, g = (pred == k) & valid, target == k
        surf = surface_metrics(p, g, tol)
        tp, fp, fn = (int(v) for v in counts[k - 1])
        gt_pos, pred_pos = tp + fn > 0, tp + fp >= min_detect_pixels
        classes.append(
            {
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "dice": float(sc.dice[k - 1]),
                "iou": float(sc.iou[k - 1]),
                "gt_pixels": tp + fn,
                "pred_pixels": tp + fp,
                "hd95": surf.hd95,
                "surface_dice": surf.surface_dice,
                "error": error_type(gt_pos, pred_pos),
                **lesion_counts(p, g),
            }
        )
    return {"pixels": int(target.size), "tolerance_px": tol, "classes": classes}


def _sum(rows: Sequence[dict[str, Any]], key: str) -> int:
    return int(sum(r[key] for r in rows))


def _finite_mean(values: Sequence[float]) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def patient_rows(
    images: Sequence[dict[str, Any]], class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per (patient, class): counts summed over the slices, sorted worst Dice first."""
    by_patient: dict[str, list[dict[str, Any]]] = {}
    for im in images:
        by_patient.setdefault(im["patient"], []).append(im)
    rows = []
    for patient, ims in by_patient.items():
        for k, name in enumerate(class_names):
            cs = [im["classes"][k] for im in ims]
            tp, fp, fn = _sum(cs, "tp"), _sum(cs, "fp"), _sum(cs, "fn")
            sc = scores(torch.tensor([tp, fp, fn]))
            gt_pos = [c["gt_pixels"] > 0 for c in cs]
            pred_pos = [c["error"] in ("tp", "fp") for c in cs]
            rows.append(
                {
                    "patient": patient,
                    "class": name,
                    "slices": len(ims),
                    "positive_slices": int(sum(gt_pos)),
                    "dice": float(sc.dice),
                    "iou": float(sc.iou),
                    "gt_pixels": tp + fn,
                    "pred_pixels": tp + fp,
                    "hd95_mean": _finite_mean([c["hd95"] for c in cs if c["error"] == "tp"]),
                    "surface_dice_mean": _finite_mean(
                        [c["surface_dice"] for c in cs if c["gt_pixels"]]
                    ),
                    "lesions": _sum(cs, "lesions"),
                    "lesions_hit": _sum(cs, "hit"),
                    "false_lesions": _sum(cs, "false"),
                    "slice_errors": {e: sum(c["error"] == e for c in cs) for e in ERROR_TYPES},
                    "detection": error_type(any(gt_pos), any(pred_pos)),
                }
            )
    return sorted(rows, key=lambda r: (r["dice"], r["patient"], r["class"]))


def roc_curve(scores_: Sequence[float], positives: Sequence[bool]) -> dict[str, Any]:
    """ROC points (one per distinct score, descending) and the trapezoid AUROC.

    Tied scores move together (one point), so the curve never credits an order the score
    does not make. AUROC is NaN when either class is absent.
    """
    s = np.asarray(scores_, dtype=np.float64)
    y = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return {"fpr": [], "tpr": [], "thresholds": [], "auroc": float("nan")}
    fpr, tpr, thr = [0.0], [0.0], [float("inf")]
    for t in np.unique(s)[::-1]:
        pred = s >= t
        tpr.append(float((pred & y).sum() / n_pos))
        fpr.append(float((pred & ~y).sum() / n_neg))
        thr.append(float(t))
    x, h = np.asarray(fpr), np.asarray(tpr)
    auroc = float(np.sum((x[1:] - x[:-1]) * (h[1:] + h[:-1]) / 2))  # trapezoids
    return {"fpr": fpr, "tpr": tpr, "thresholds": thr, "auroc": auroc}


def _summary(
    images: list[dict[str, Any]], patients: list[dict[str, Any]], k: int, name: str
) -> dict[str, Any]:
    cs = [im["classes"][k] for im in images]
    errors = {e: sum(c["error"] == e for c in cs) for e in ERROR_TYPES}
    p_err = {
        e: sum(r["detection"] == e for r in patients if r["class"] == name) for e in ERROR_TYPES
    }

    def rate(a: int, b: int) -> float:
        return a / (a + b) if a + b else float("nan")

    lesions, hit = _sum(cs, "lesions"), _sum(cs, "hit")
    roc = roc_curve(
        [c["pred_pixels"] / im["pixels"] for c, im in zip(cs, images, strict=True)],
        [c["gt_pixels"] > 0 for c in cs],
    )
    return {
        "slice_errors": errors,
        "slice_sensitivity": rate(errors["tp"], errors["fn"]),
        "slice_specificity": rate(errors["tn"], errors["fp"]),
        "patient_errors": p_err,
        "patient_sensitivity": rate(p_err["tp"], p_err["fn"]),
        "patient_specificity": rate(p_err["tn"], p_err["fp"]),
        "lesions": lesions,
        "lesions_hit": hit,
        "lesion_sensitivity": hit / lesions if lesions else float("nan"),
        "false_lesions": _sum(cs, "false"),
        "hd95_mean": _finite_mean([c["hd95"] for c in cs if c["error"] == "tp"]),
        "surface_dice_mean": _finite_mean([c["surface_dice"] for c in cs if c["gt_pixels"]]),
        "roc": roc,
    }


def evaluate_predictions(
    pred_dir: Path,
    index: DatasetIndex,
    samples: Sequence[Sample],
    min_detect_pixels: int = 1,
    surface_tolerance: float = 0.01,
) -> dict[str, Any]:
    """Evaluate every sample that has both a prediction PNG in ``pred_dir`` and a mask.

    Returns ``{"images": [...], "patients": [...], "summary": {class: {...}}, ...}``, images
    sorted worst first (by the mean Dice over classes, then id).
    """
    k = len(index.classes)
    images: list[dict[str, Any]] = []
    for s in samples:
        ppath = pred_dir / f"{s.id}.png"
        if s.mask is None or not ppath.is_file():
            continue
        pred, target = read_mask(ppath), read_mask(index.path(s.mask))
        row = evaluate_image(pred, target, k, min_detect_pixels, surface_tolerance)
        images.append(
            {
                "id": s.id,
                "patient": s.group,
                "slice": s.slice,
                "image": s.image,
                "mask": s.mask,
                **row,
            }
        )
    images.sort(key=lambda r: (float(np.mean([c["dice"] for c in r["classes"]])), r["id"]))
    patients = patient_rows(images, index.classes)
    return {
        "min_detect_pixels": min_detect_pixels,
        "surface_tolerance": surface_tolerance,
        "num_images": len(images),
        "images": images,
        "patients": patients,
        "summary": {
            name: _summary(images, patients, i, name) for i, name in enumerate(index.classes)
        }
        if images
        else {},
    }


__all__ = [
    "CASES_JSON",
    "VAL_CASES_JSON",
    "VAL_PREDICTIONS",
    "evaluate_image",
    "evaluate_predictions",
    "lesion_counts",
    "patient_rows",
    "roc_curve",
    "spread_over_patients",
    "surface_metrics",
]
