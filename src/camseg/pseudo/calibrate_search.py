"""The search behind ``pseudo.calibrate``: policies scored on the validation patients' masks.

Pure tensors in, a table out (no files, no model): :func:`search` takes the validation
CAMs (at the size the pseudo-masks are made, as stage 2 makes them), their images and
ground truth, and a :class:`Grid`. Cost is bounded: the CRF runs once per CRF candidate
(on the positive images only: a negative image's pseudo-mask is all background whatever
the policy), and every threshold rule, threshold and clean-up size reuses its posterior.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from camseg.cam.base import present_mask
from camseg.cam.crf import CRFConfig, crf_refine
from camseg.cam.policy import (
    PseudoMaskPolicy,
    remove_small_components,
    rule_thresholds_many,
    threshold_cams,
)
from camseg.constants import BACKGROUND
from camseg.overlap import confusion_counts, scores
from camseg.units import Grid


@dataclass
class ValidationSet:
    """The validation images with ground truth, as stage 2 would threshold them.

    ``groups``: one entry per image size, each ``(cams (N,K,H,W) float32 in [0,1], labels
    (N,K), images (N,C,H,W) uint8 for the CRF, gt (N,H,W) uint8)`` of the *positive*
    images; ``negative_counts``: (K,3) tp/fp/fn of the negative images (all background).
    """

    groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    negative_counts: torch.Tensor
    num_classes: int
    samples: int
    positives: int
    patients: int


def _crf_candidates(base: CRFConfig | None, grid: Grid) -> list[CRFConfig | None]:
    if not grid.crf_bg_powers:
        return [None]
    base = base or CRFConfig()
    return [None, *(dataclasses.replace(base, bg_power=p) for p in grid.crf_bg_powers)]


class _Posteriors:
    """The maps the thresholds apply to, per CRF candidate, computed once each."""

    def __init__(self, val: ValidationSet) -> None:
        self.val = val
        self._cache: dict[CRFConfig | None, list[torch.Tensor]] = {}

    def get(self, crf: CRFConfig | None) -> list[torch.Tensor]:
        if crf not in self._cache:
            out = []
            for cams, labels, images, _ in self.val.groups:
                if crf is None:
                    out.append(cams)
                else:
                    present = present_mask(labels, cams.shape[0])
                    out.append(crf_refine(cams, present, images, crf))
            self._cache[crf] = out
        return self._cache[crf]


def _counts(val: ValidationSet, masks: list[torch.Tensor]) -> torch.Tensor:
    total = val.negative_counts.clone()
    for mask, (_, _, _, gt) in zip(masks, val.groups, strict=True):
        total += confusion_counts(mask, gt, val.num_classes).sum(0)
    return total


def _dice(counts: torch.Tensor) -> float:
    return float(scores(counts).dice.mean())


def evaluate(val: ValidationSet, post: _Posteriors, policy: PseudoMaskPolicy) -> dict[str, float]:
    """Validation Dice of one policy, and the share of lesion pixels it labels background."""
    masks, missed, lesion = [], 0, 0
    for probs, (_, labels, _, gt) in zip(post.get(policy.crf), val.groups, strict=True):
        mask = policy.threshold(probs, labels)
        masks.append(mask)
        lesion_px = (gt > 0) & (gt != 255)
        missed += int((lesion_px & (mask == BACKGROUND)).sum())
        lesion += int(lesion_px.sum())
    return {"dice": _dice(_counts(val, masks)), "missed_as_background": missed / max(lesion, 1)}


def _fg_table(
    val: ValidationSet, post: _Posteriors, grid: Grid, crfs: list[CRFConfig | None]
) -> list[dict[str, Any]]:
    """Validation Dice of every (CRF, rule, foreground threshold, component size) candidate."""
    rows: list[dict[str, Any]] = []
    fgs = sorted(set(grid.fg_thresholds))
    for crf in crfs:
        probs_groups = post.get(crf)
        for rule in grid.rules:
            per_group = [rule_thresholds_many(p, rule, fgs) for p in probs_groups]
            for i, fg in enumerate(fgs):
                masks = [
                    threshold_cams(p, present_mask(lab, p.shape[0]), t[i], t[i])
                    for p, t, (_, lab, _, _) in zip(
                        probs_groups, per_group, val.groups, strict=True
                    )
                ]
                for size in grid.min_component_sizes:
                    cleaned = [remove_small_components(m, size) if size > 0 else m for m in masks]
                    rows.append(
                        {
                            "crf_bg_power": None if crf is None else crf.bg_power,
                            "rule": rule,
                            "fg_threshold": fg,
                            "min_component_size": size,
                            "dice": _dice(_counts(val, cleaned)),
                        }
                    )
    return rows


def _choose_bg(
    val: ValidationSet,
    post: _Posteriors,
    grid: Grid,
    top: dict[str, Any],
    crf: CRFConfig | None,
    multilabel: bool,
) -> tuple[PseudoMaskPolicy, list[dict[str, Any]]]:
    """The highest background threshold (at most the chosen foreground one) that keeps the
    misses within ``grid.max_missed_as_background``, else the smallest; and every one's scores."""
    bg_rows = []
    chosen = None
    for bg in sorted(
        (b for b in set(grid.bg_thresholds) if b <= top["fg_threshold"]), reverse=True
    ):
        policy = PseudoMaskPolicy(
            top["fg_threshold"],
            bg,
            multilabel,
            top["min_component_size"],
            crf,
            top["rule"],
        )
        result = evaluate(val, post, policy)
        bg_rows.append({"bg_threshold": bg, **result})
        if chosen is None and result["missed_as_background"] <= grid.max_missed_as_background:
            chosen = policy
    if chosen is None:  # no candidate keeps the misses low enough: the smallest one
        smallest = min([*grid.bg_thresholds, top["fg_threshold"]])
        chosen = PseudoMaskPolicy(
            top["fg_threshold"],
            smallest,
            multilabel,
            top["min_component_size"],
            crf,
            top["rule"],
        )
    return chosen, bg_rows


def search(
    val: ValidationSet, grid: Grid, configured: PseudoMaskPolicy, with_crf: bool
) -> dict[str, Any]:
    """Score every candidate; return the table, the chosen policy and both policies' Dice."""
    post = _Posteriors(val)
    crfs: list[CRFConfig | None] = _crf_candidates(configured.crf, grid) if with_crf else [None]
    rows = _fg_table(val, post, grid, crfs)
    best = max(range(len(rows)), key=lambda i: (rows[i]["dice"], -i))  # first of equals
    top = rows[best]
    crf = crfs[[None if c is None else c.bg_power for c in crfs].index(top["crf_bg_power"])]
    chosen, bg_rows = _choose_bg(val, post, grid, top, crf, configured.multilabel)
    return {
        "table": rows,
        "bg_search": bg_rows,
        "policy": chosen,
        "val_dice": evaluate(val, post, chosen)["dice"],
        "configured_val_dice": evaluate(val, post, configured)["dice"],
    }
