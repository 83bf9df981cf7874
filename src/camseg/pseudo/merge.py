"""The end of stage 2: merge the per-sample rows into manifest.json and write quality.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from camseg.errors import CamsegError
from camseg.pseudo.coverage import coverage_stats, summary_lines
from camseg.pseudo.quality import compute_quality, swept_map, write_quality
from camseg.rundir import RunDir
from camseg.utils.io import write_json_atomic

log = logging.getLogger("camseg.pseudo.stage")  # the stage's logger, as before the split


def _read_rows(out: Path, ids: list[str]) -> list[dict[str, Any]]:
    """The per-sample rows of ``ids``, sorted by id; every sample must have one."""
    rows = []
    missing = []
    for sid in sorted(ids):
        p = out / "rows" / f"{sid}.json"
        if not p.is_file():
            missing.append(sid)
            continue
        rows.append(json.loads(p.read_text(encoding="utf-8")))
    if missing:
        raise CamsegError(
            f"{out}: {len(missing)} samples have no pseudo-label (e.g. {missing[0]}); run stage pseudo again to finish"
        )
    return rows


def finalize(
    cfg: DictConfig,
    run: RunDir,
    provenance: dict[str, Any],
    ids: list[str],
    classes: list[str],
    shortcut: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge the per-sample rows into manifest.json (sorted by id) and write quality.json;
    ``shortcut``: the audit's flagged verdict (:mod:`camseg.pseudo.audit_check`), recorded."""
    out = run.pseudo
    rows = _read_rows(out, ids)
    manifest = dict(provenance)
    manifest["samples"] = [{k: v for k, v in r.items() if k != "quality"} for r in rows]
    fg_threshold = float(provenance["policy"]["fg_threshold"])  # calibrated or configured
    quality = compute_quality(rows, classes, list(cfg.pseudo.sweep_thresholds), fg_threshold)
    if quality and "sweep" in quality:  # what the swept thresholds were applied to
        quality["sweep"]["map"] = swept_map(provenance["policy"])
    coverage = coverage_stats(rows, classes, fg_threshold)
    write_quality({**(quality or {}), "coverage": coverage}, out)
    # Written last: a manifest on disk means the stage is complete.
    manifest_sorted = {k: manifest[k] for k in provenance}
    if shortcut is not None:
        manifest_sorted["audit_shortcut"] = shortcut
    manifest_sorted["samples"] = manifest["samples"]
    write_json_atomic(run.manifest, manifest_sorted)
    return _summarise(rows, coverage, quality, shortcut)


def _summarise(
    rows: list[dict[str, Any]],
    coverage: dict[str, Any],
    quality: dict[str, Any] | None,
    shortcut: dict[str, Any] | None,
) -> dict[str, Any]:
    """The stage's result (and its log lines): sample count, foreground, coverage, quality."""
    fg = float(np.mean([r["fg_fraction"] for r in rows])) if rows else 0.0
    result: dict[str, Any] = {"stage": "pseudo", "samples": len(rows), "mean_fg_fraction": fg}
    if shortcut is not None:
        result["audit_shortcut"] = shortcut["causes"]
    result["positive_coverage"] = {
        c: v["positive_coverage"] for c, v in coverage["per_class"].items()
    }
    for line in summary_lines(coverage):
        log.info("stage pseudo: %s", line)
    if quality is not None:
        result["quality"] = {
            "pseudo/dice": quality["dice"],
            "pseudo/iou": quality["iou"],
            "pseudo/best_threshold": quality["sweep"]["best_threshold"],
            "pseudo/best_dice": quality["sweep"]["best_dice"],
        }
        log.info(
            "stage pseudo: Dice %.3f at fg_threshold=%.2f; best sweep Dice %.3f at %.2f",
            quality["dice"],
            quality["fg_threshold"],
            quality["sweep"]["best_dice"],
            quality["sweep"]["best_threshold"],
        )
    return result
