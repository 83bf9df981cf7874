"""From per-map rows to audit.json's numbers: means per method, class and patient, verdicts."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from camseg.audit.metrics import BORDERS, CORNERS
from camseg.audit.shortcut import ShortcutRule, dataset_verdict, fixed_location, image_flags

LOCALISATION = ("energy_pointing", "pointing_game")
FAITHFULNESS = ("deletion_auc", "insertion_auc", "average_drop", "confidence_drop", "increase")
#: Flagged maps listed by id in audit.json (the counts cover all of them).
MAX_LISTED = 100


def mean(values: Sequence[float]) -> float | None:
    """Mean of the finite values; None when there is none (JSON null, not NaN)."""
    xs = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(xs)) if xs else None


def _per_patient(rows: list[dict[str, Any]], method: str, key: str) -> dict[str, Any]:
    by_group: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        by_group[r["group"]].append(r["methods"][method][key])
    means = [m for m in (mean(v) for v in by_group.values()) if m is not None]
    return {
        "mean": mean(means),
        "std": float(np.std(means, ddof=1)) if len(means) > 1 else None,
        "patients": len(means),
    }


def _localisation(rows: list[dict[str, Any]], method: str, classes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        key: mean([r["methods"][method][key] for r in rows]) for key in LOCALISATION
    }
    out["maps_with_mask"] = sum(
        1 for r in rows if math.isfinite(r["methods"][method]["energy_pointing"])
    )
    out["per_class"] = {
        c: {
            key: mean([r["methods"][method][key] for r in rows if r["class"] == k])
            for key in LOCALISATION
        }
        for k, c in enumerate(classes)
    }
    out["per_patient"] = {key: _per_patient(rows, method, key) for key in LOCALISATION}
    return out


def _anatomy(rows: list[dict[str, Any]], method: str) -> dict[str, Any]:
    ms = [r["methods"][method] for r in rows]
    return {
        "out_of_body_share": mean([m["out_of_body"] for m in ms]),
        "out_of_body_area": mean([m["out_of_body_area"] for m in ms]),
        "border_share": {b: mean([m["border_share"][b] for m in ms]) for b in BORDERS},
        "corner_share": {c: mean([m["corner_share"][c] for m in ms]) for c in CORNERS},
    }


def focus_overlap(focus: torch.Tensor) -> list[list[float | None]]:
    """(K,S,S) mean maps -> (K,K) soft IoU ``sum(min) / sum(max)`` (None for an empty class)."""
    k = len(focus)
    flat = focus.flatten(1).double()
    out: list[list[float | None]] = []
    for i in range(k):
        row: list[float | None] = []
        for j in range(k):
            hi = torch.maximum(flat[i], flat[j]).sum().item()
            row.append(None if hi <= 0 else torch.minimum(flat[i], flat[j]).sum().item() / hi)
        out.append(row)
    return out


def summarise_method(
    rows: list[dict[str, Any]],
    method: str,
    classes: list[str],
    rule: ShortcutRule,
    mean_map: torch.Tensor | None = None,
) -> dict[str, Any]:
    """One method's section of audit.json; ``mean_map`` (H,W): the mean of its maps, for
    the fixed-location test (left out when None)."""
    ms = [r["methods"][method] for r in rows]
    flags = image_flags(
        torch.tensor([m["out_of_body"] for m in ms], dtype=torch.float64),
        torch.tensor([m["out_of_body_area"] for m in ms], dtype=torch.float64),
        torch.tensor([m["peak_corner"] for m in ms], dtype=torch.long),
        rule,
    )
    fixed = None if mean_map is None else fixed_location(mean_map, rule.corner_band)
    verdict = dataset_verdict(flags, rule, fixed)
    verdict["flagged_maps"] = [
        {"id": r["id"], "class": classes[r["class"]], "reasons": f}
        for r, f in zip(rows, flags, strict=True)
        if f
    ][:MAX_LISTED]
    out: dict[str, Any] = {
        "localisation": _localisation(rows, method, classes),
        "anatomy": _anatomy(rows, method),
        "shortcut": verdict,
    }
    if ms and "deletion_auc" in ms[0]:
        out["faithfulness"] = {key: mean([m[key] for m in ms]) for key in FAITHFULNESS}
    return out


def focus_summary(sums: torch.Tensor, counts: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Outcome focus from (K,2,S,S) map sums and (K,2) counts (correct, wrong top class)."""
    per_class = sums.sum(dim=1) / counts.sum(dim=1).clamp_min(1)[:, None, None]
    return {
        "counts": {
            c: {"predicted": int(counts[i, 0]), "missed": int(counts[i, 1])}
            for i, c in enumerate(classes)
        },
        "class_overlap": focus_overlap(per_class) if len(classes) > 1 else None,
    }
