"""Does stage 2 hand stage 3 any foreground? Coverage of the positive images, per class.

A classifier can rank images well while its CAMs, after the CRF and the small-blob
clean-up, leave nothing on small lesions: every pseudo-mask is background and the
segmenter learns to predict nothing. These statistics make that visible (quality.json,
the log, report.md), and :func:`coverage_problem` turns it into a stop before stage 3.

Everything comes from the per-sample manifest rows, which the writer fills in the pass
that makes the masks (no second pass over the images):

- ``class_fraction`` (K,): share of the image's pixels labelled class k in the pseudo-mask.
- ``cam_support`` (K,): share of pixels where the normalised CAM of class k passes
  ``fg_threshold`` read under ``pseudo.threshold_rule`` (``PseudoMaskPolicy.fg_support``, the
  masks' own test), *before* CRF refinement and small-blob clean-up: what the classifier
  found, beside what the policy kept.
- ``ignore_fraction``: share of pixels labelled 255.
- ``quality.gt_fraction`` (K,), where ground truth exists: the same share in the true mask.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from camseg.errors import CamsegError, ConfigError, CoverageStop
from camseg.utils.io import read_json

log = logging.getLogger(__name__)

DEFINITION = (
    "over the positive images of each class (image label 1): positive_coverage = share whose pseudo-mask "
    "has any pixel of the class; areas are shares of the image: pseudo_area = pixels of the class in the "
    "pseudo-mask, cam_support_area = pixels where the normalised CAM of the class passes fg_threshold (under the "
    "threshold rule) before "
    "CRF refinement and small-blob clean-up, gt_area = pixels of the class in the ground truth (where it "
    "exists); ignore fractions are means over the class's positive and negative images"
)


def row_arrays(
    rows: Sequence[dict[str, Any]], num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """labels (N,K) bool, class_fraction (N,K), cam_support (N,K), gt_fraction (N,K), ignore (N,).

    Unknown values are NaN. Rows written before ``class_fraction`` existed fall back to
    ``fg_fraction`` for each present class (exact for one class; an upper bound otherwise,
    so an all-background mask is still seen as one).
    """
    n, k = len(rows), num_classes
    labels = np.zeros((n, k), bool)
    frac = np.full((n, k), np.nan)
    support = np.full((n, k), np.nan)
    gt = np.full((n, k), np.nan)
    ignore = np.zeros(n)
    for i, r in enumerate(rows):
        labels[i] = np.asarray(r["labels"], dtype=bool)
        if "class_fraction" in r:
            frac[i] = r["class_fraction"]
        else:
            frac[i] = np.where(labels[i], float(r.get("fg_fraction", 0.0)), 0.0)
        if "cam_support" in r:
            support[i] = r["cam_support"]
        g = r.get("quality", {}).get("gt_fraction")
        if g is not None:
            gt[i] = g
        ignore[i] = float(r.get("ignore_fraction", 0.0))
    return labels, frac, support, gt, ignore


def distribution(values: np.ndarray) -> dict[str, float] | None:
    """p10 / median / p90 / mean of the finite values, None when there are none."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return None
    p10, median, p90 = np.percentile(v, [10, 50, 90])
    return {"p10": float(p10), "median": float(median), "p90": float(p90), "mean": float(v.mean())}


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def coverage_stats(
    rows: Sequence[dict[str, Any]], classes: Sequence[str], fg_threshold: float | None = None
) -> dict[str, Any]:
    """Per class: positive coverage, pseudo-mask vs CAM-support (vs truth) areas, ignore fractions.

    Args:
        rows: manifest rows (``labels``, ``class_fraction``, ``cam_support``, ``ignore_fraction``,
            optional ``quality.gt_fraction``).
        classes: the K class names.
        fg_threshold: the policy's threshold that ``cam_support`` was measured at (recorded).
    """
    labels, frac, support, gt, ignore = row_arrays(rows, len(classes))
    per_class: dict[str, Any] = {}
    for k, name in enumerate(classes):
        pos = labels[:, k]
        n_pos = int(pos.sum())
        covered = int(np.count_nonzero(frac[pos, k] > 0))
        per_class[name] = {
            "positives": n_pos,
            "with_foreground": covered,
            "positive_coverage": covered / n_pos if n_pos else None,
            "pseudo_area": distribution(frac[pos, k]),
            "cam_support_area": distribution(support[pos, k]),
            "gt_area": distribution(gt[pos, k]),
            "ignore_fraction_positives": _mean(ignore[pos]),
            "ignore_fraction_negatives": _mean(ignore[~pos]),
        }
    return {
        "definition": DEFINITION,
        "samples": len(rows),
        "fg_threshold": fg_threshold,
        "per_class": per_class,
    }


def check_min_coverage(value: Any) -> float:
    """``pseudo.min_positive_coverage`` as a float in [0, 1] (0 disables the stop)."""
    try:
        v = float(value if value is not None else 0.0)
    except (TypeError, ValueError):
        v = float("nan")
    if not 0.0 <= v <= 1.0:
        raise ConfigError(
            f"pseudo.min_positive_coverage={value}: must be in [0, 1] (0 disables the check)"
        )
    return v


def _pct(d: dict[str, float] | None, key: str = "median") -> str:
    return "n/a" if d is None else f"{100 * d[key]:.2g} %"


def coverage_problem(
    coverage: dict[str, Any],
    min_coverage: float,
    policy: dict[str, Any] | None = None,
    rerun: str = "stage pseudo",
) -> str | None:
    """One line saying what was found and what to change, or None when every class is covered.

    Classes without positive images are not judged; ``min_coverage`` 0 disables the check.
    ``rerun`` names the stages to run again (with force=true) after changing the settings.
    """
    if min_coverage <= 0:
        return None
    low = [
        (name, c)
        for name, c in coverage["per_class"].items()
        if c["positive_coverage"] is not None and c["positive_coverage"] < min_coverage
    ]
    if not low:
        return None
    name, c = min(low, key=lambda nc: nc[1]["positive_coverage"])
    others = f" (also {', '.join(repr(n) for n, _ in low if n != name)})" if len(low) > 1 else ""
    found = (
        f"pseudo-masks of class '{name}'{others} have foreground on {c['with_foreground']} of "
        f"{c['positives']} positive images (positive coverage {c['positive_coverage']:.2f} < "
        f"pseudo.min_positive_coverage={min_coverage:g}; median area: CAM >= fg_threshold "
        f"{_pct(c['cam_support_area'])}, pseudo-mask {_pct(c['pseudo_area'])}"
        + (f", truth {_pct(c['gt_area'])}" if c.get("gt_area") else "")
        + ")"
    )
    policy = policy or {}
    fixes = [f"lower pseudo.fg_threshold ({policy.get('fg_threshold', '?')})"]
    crf = policy.get("crf")
    if crf:
        fixes.append(
            f"raise pseudo.crf.bg_power ({crf.get('bg_power')}; below 1 it grows the background "
            "prior) or set pseudo.crf=null"
        )
    if policy.get("min_component_size"):
        fixes.append(
            f"lower pseudo.min_component_size ({policy['min_component_size']:g} of the image area)"
        )
    cam = c.get("cam_support_area")
    if cam is not None and cam["median"] == 0:
        fixes.insert(0, "check the classifier (its CAMs are empty on positives)")
    else:
        fixes.append("check the classifier")
    return (
        f"{found}; stage seg would learn to predict background only: "
        + ", ".join(fixes)
        + f", then re-run {rerun} with force=true; or set pseudo.min_positive_coverage=0 "
        "to train on them anyway"
    )


def empty_classes(coverage: dict[str, Any]) -> list[str]:
    """Classes with positive images none of whose pseudo-masks has a pixel of the class."""
    return [
        name
        for name, c in coverage["per_class"].items()
        if c["positives"] and not c["with_foreground"]
    ]


def summary_lines(coverage: dict[str, Any]) -> list[str]:
    """Compact log lines, one per class."""
    out = []
    for name, c in coverage["per_class"].items():
        if not c["positives"]:
            out.append(f"class '{name}': no positive images")
            continue
        pa, ca = c["pseudo_area"], c["cam_support_area"]
        line = (
            f"class '{name}': foreground on {c['with_foreground']}/{c['positives']} positives "
            f"(coverage {c['positive_coverage']:.2f}); area % p10/median/p90: pseudo-mask "
            + (
                "n/a"
                if pa is None
                else f"{100 * pa['p10']:.2g}/{100 * pa['median']:.2g}/{100 * pa['p90']:.2g}"
            )
            + ", CAM >= fg_threshold "
            + (
                "n/a"
                if ca is None
                else f"{100 * ca['p10']:.2g}/{100 * ca['median']:.2g}/{100 * ca['p90']:.2g}"
            )
        )
        if c.get("gt_area"):
            g = c["gt_area"]
            line += f", truth {100 * g['p10']:.2g}/{100 * g['median']:.2g}/{100 * g['p90']:.2g}"
        ip, ineg = c["ignore_fraction_positives"], c["ignore_fraction_negatives"]
        line += (
            f"; ignore {'n/a' if ip is None else f'{ip:.3f}'} on positives, "
            f"{'n/a' if ineg is None else f'{ineg:.3f}'} on negatives"
        )
        out.append(line)
    return out


def stop_if_uncovered_run(cfg: Any, run: Any, provenance: dict[str, Any]) -> None:
    """Stage 2's gate: after its artifacts are written, stop the run when a class is uncovered.

    Every DDP rank reads the same quality.json (written by rank 0 before the barrier), so all
    ranks stop together; the pipeline catches :class:`CoverageStop` to write report.md first.
    """
    min_coverage = check_min_coverage(cfg.pseudo.get("min_positive_coverage", 0.0))
    path = run.pseudo / "quality.json"
    coverage = read_json(path).get("coverage") if path.is_file() else None
    problem = (
        None
        if coverage is None
        else coverage_problem(coverage, min_coverage, provenance.get("policy"))
    )
    if problem is None:
        if coverage is not None and empty_classes(coverage):
            # The stop is off, but the loudest case still gets said.
            log.warning(
                "stage pseudo: WARNING: no pseudo-mask has foreground of class(es) %s on any "
                "positive image (pseudo.min_positive_coverage=%g does not stop the run); see %s",
                empty_classes(coverage),
                min_coverage,
                path,
            )
        return
    log.error("stage pseudo: %s", problem)
    raise CoverageStop(f"{path}: {problem}")


def check_manifest_coverage(manifest: Any, train_ids: Any, min_positive_coverage: Any) -> None:
    """Stage 3's gate: refuse a manifest whose training pseudo-masks fail stage 2's coverage check.

    Recomputed from the manifest's own rows (the training samples ``train_ids``), so a
    ``stages=[seg]`` run cannot slip past a stage 2 that stopped.
    """
    min_coverage = check_min_coverage(min_positive_coverage)
    ids = set(train_ids)
    rows = [r for r in manifest.samples if r["id"] in ids]
    coverage = coverage_stats(rows, manifest.classes)
    problem = coverage_problem(
        coverage, min_coverage, manifest.data.get("policy"), rerun="stages=[pseudo,seg]"
    )
    if problem is not None:
        raise CamsegError(f"{manifest.path}: stage seg refuses these pseudo-masks: {problem}")
