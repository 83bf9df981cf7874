"""Pseudo-mask quality against ground truth, from the per-sample counts in manifest rows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from camseg.overlap import scores
from camseg.utils.io import pyplot, save_figure_atomic, write_json_atomic


def compute_quality(
    rows: Sequence[dict[str, Any]],
    classes: list[str],
    thresholds: Sequence[float],
    fg_threshold: float,
) -> dict[str, Any] | None:
    """Dataset-level Dice/IoU of the pseudo-masks (ignore counted as not foreground) and the threshold sweep.

    Counts are summed over all samples with ground truth, then Dice per class (the
    empty-mask rule of :mod:`camseg.overlap`), then the macro mean over classes. Returns
    None when no sample has ground truth.
    """
    rows = [r for r in rows if "quality" in r]
    if not rows:
        return None
    counts = np.array([r["quality"]["counts"] for r in rows], dtype=np.int64).sum(axis=0)  # (K,3)
    sweep = np.array([r["quality"]["sweep"] for r in rows], dtype=np.int64).sum(axis=0)  # (T,K,3)
    dice, iou, recall, precision = (x.numpy() for x in scores(torch.from_numpy(counts)))
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    s_dice, s_iou = (x.numpy() for x in scores(torch.from_numpy(sweep))[:2])
    macro = s_dice.mean(axis=1)
    best = int(np.argmax(macro))
    ignore = float(np.mean([r.get("ignore_fraction", 0.0) for r in rows]))
    return {
        "samples_with_gt": len(rows),
        "classes": classes,
        "fg_threshold": fg_threshold,
        "dice": float(dice.mean()),
        "iou": float(iou.mean()),
        "precision": float(np.nanmean(precision)) if np.isfinite(precision).any() else None,
        "recall": float(np.nanmean(recall)) if np.isfinite(recall).any() else None,
        "ignore_fraction": ignore,
        "per_class": {
            c: {
                "dice": float(dice[k]),
                "iou": float(iou[k]),
                "tp": int(tp[k]),
                "fp": int(fp[k]),
                "fn": int(fn[k]),
            }
            for k, c in enumerate(classes)
        },
        "sweep": {
            "thresholds": [float(t) for t in thresholds],
            "dice": [float(v) for v in macro],
            "iou": [float(v) for v in s_iou.mean(axis=1)],
            "dice_per_class": {c: [float(v) for v in s_dice[:, k]] for k, c in enumerate(classes)},
            "best_threshold": float(thresholds[best]),
            "best_dice": float(macro[best]),
            "note": "map >= threshold -> foreground (argmax over present classes), everything else background; "
            "the map is the CRF posterior when the policy uses a CRF, else the normalised CAM",
        },
    }


def swept_map(policy: dict[str, Any]) -> str:
    """What the threshold sweep thresholds, for the plot's axis: the CRF's posterior when the
    policy refines with the CRF, else the normalised CAM; under a relative threshold rule,
    the thresholds read as that rule says."""
    base = "CRF posterior" if policy.get("crf") else "normalised CAM"
    rule = policy.get("threshold_rule", "absolute")
    return base if rule in (None, "absolute") else f"{base} ({rule})"


def plot_sweep(quality: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    sw = quality["sweep"]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    ax.plot(sw["thresholds"], sw["dice"], marker="o", label="Dice (macro)")
    ax.plot(sw["thresholds"], sw["iou"], marker="s", label="IoU (macro)")
    ax.axvline(
        quality["fg_threshold"],
        color="grey",
        ls="--",
        lw=1,
        label=f"fg_threshold={quality['fg_threshold']}",
    )
    ax.axvline(
        sw["best_threshold"], color="green", ls=":", lw=1, label=f"best={sw['best_threshold']}"
    )
    ax.set_xlabel(f"threshold on the {sw.get('map', 'normalised CAM')}")
    ax.set_ylabel("score vs ground truth")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Pseudo-mask threshold sweep")
    fig.tight_layout()
    save_figure_atomic(path, fig)


def write_quality(quality: dict[str, Any], out_dir: Path) -> None:
    """quality.json (coverage always, scores against ground truth where it exists) and the sweep plot."""
    write_json_atomic(out_dir / "quality.json", quality)
    if "sweep" in quality:
        plot_sweep(quality, out_dir / "threshold_sweep.png")
