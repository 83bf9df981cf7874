"""Cross-validation by patient: the summary of the fold run directories.

``camseg -m experiment=lgg_mri cv.fold=0,1,2,3,4`` trains every fold in
``<run>/fold<k>`` (test patients: fold k, see :func:`camseg.data.splits.cv_split`); at
the end of the multirun, and on demand with ``python -m camseg.cv summarize runs/<run>``,
:func:`summarize` writes ``<run>/cv_summary.json`` and ``<run>/cv_summary.md``: one row per
fold (pseudo-mask Dice on the training patients, segmenter test Dice and IoU), mean ± sd
over folds, and a patient-level bootstrap 95 % interval of the test Dice.

The folds' test sets are disjoint and cover every patient, so each patient is tested
once. Per-patient counts are recomputed from ``seg/predictions/<id>.png`` against the
dataset's masks with :func:`camseg.overlap.confusion_counts` (the counting of every
camseg metric); the bootstrap resamples patients with replacement and recomputes the
dataset-level Dice (counts summed first, as ``test/dice``) and the mean per-patient Dice.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from camseg.overlap import confusion_counts, scores
from camseg.utils.io import read_mask, write_json_atomic, write_text_atomic

FOLD_DIR = re.compile(r"^fold(\d+)$")
BOOTSTRAP_SAMPLES = 2000


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def fold_dirs(run_root: Path) -> list[tuple[int, Path]]:
    """``(k, <run>/fold<k>)`` for every fold directory, by k."""
    out = []
    for p in run_root.iterdir() if run_root.is_dir() else []:
        m = FOLD_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def patient_counts(fold_dir: Path) -> dict[str, np.ndarray]:
    """Per test patient, (K,3) tp/fp/fn of the segmenter's test predictions vs the masks.

    The dataset is the one stage 2 recorded (``pseudo/manifest.json``: root and classes);
    every prediction of a test image with a mask counts.
    """
    from camseg.data.folder import load_index

    manifest = _read(fold_dir / "pseudo" / "manifest.json")
    pred_dir = fold_dir / "seg" / "predictions"
    if manifest is None or not pred_dir.is_dir():
        return {}
    classes = list(manifest["dataset"]["classes"])
    index = load_index(Path(manifest["dataset"]["root"]), classes=classes)
    out: dict[str, np.ndarray] = {}
    for s in index.samples:
        pred_path = pred_dir / f"{s.id}.png"
        if not s.mask or not pred_path.is_file():
            continue
        pred = torch.from_numpy(read_mask(pred_path))[None]
        gt = torch.from_numpy(read_mask(index.path(s.mask)))[None]
        counts = confusion_counts(pred, gt, len(classes))[0].numpy()
        out[s.group] = out.get(s.group, np.zeros_like(counts)) + counts
    return out


def dataset_dice(counts: np.ndarray) -> float:
    """Dice of counts summed over patients, macro over classes. ``counts``: (P,K,3)."""
    return float(scores(torch.from_numpy(counts.sum(axis=0))).dice.mean())


def patient_dice(counts: np.ndarray) -> np.ndarray:
    """(P,) Dice per patient (macro over classes; empty truth and prediction: 1)."""
    return scores(torch.from_numpy(counts)).dice.mean(dim=-1).numpy()


def bootstrap_interval(
    counts: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Patient-level bootstrap of the dataset Dice and of the mean per-patient Dice.

    Args:
        counts: (P,K,3) tp/fp/fn per patient and class.
        samples: bootstrap resamples (patients drawn with replacement, P each).
        seed: of the resampling, so the summary is reproducible.
        level: of the percentile interval.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = len(counts)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(samples, n))
    pooled = counts[draws].sum(axis=1)  # (S,K,3)
    pooled_dice = scores(torch.from_numpy(pooled)).dice.mean(dim=-1).numpy()
    per_patient = patient_dice(counts)
    mean_dice = per_patient[draws].mean(axis=1)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return {
        "patients": n,
        "resamples": samples,
        "level": level,
        "dice": dataset_dice(counts),
        "dice_interval": [
            float(np.percentile(pooled_dice, lo)),
            float(np.percentile(pooled_dice, hi)),
        ],
        "patient_dice_mean": float(per_patient.mean()),
        "patient_dice_interval": [
            float(np.percentile(mean_dice, lo)),
            float(np.percentile(mean_dice, hi)),
        ],
    }


def fold_row(k: int, fold_dir: Path) -> dict[str, Any]:
    quality = _read(fold_dir / "pseudo" / "quality.json") or {}
    seg = _read(fold_dir / "seg" / "metrics.json") or {}
    test = seg.get("test", {})
    manifest = _read(fold_dir / "pseudo" / "manifest.json") or {}
    calibration = manifest.get("calibration") or {}
    return {
        "fold": k,
        "run_dir": str(fold_dir),
        "pseudo_dice_train": quality.get("dice"),
        "calibrated": calibration.get("status") == "calibrated",
        "seg_test_dice": test.get("test/dice"),
        "seg_test_iou": test.get("test/iou"),
        "seg_test_patient_dice_mean": test.get("test/dice_patient_mean"),
        "complete": bool(seg),
    }


def _mean_sd(values: Sequence[float | None]) -> dict[str, float | None]:
    xs = np.array([v for v in values if v is not None], dtype=float)
    if not len(xs):
        return {"mean": None, "sd": None, "n": 0}
    return {
        "mean": float(xs.mean()),
        "sd": float(xs.std(ddof=1)) if len(xs) > 1 else None,
        "n": len(xs),
    }


def summarize(run_root: Path, seed: int = 0) -> tuple[Path, Path] | None:
    """Write ``cv_summary.json`` and ``cv_summary.md`` under ``run_root``; None without folds."""
    folds = fold_dirs(run_root)
    if not folds:
        return None
    rows = [fold_row(k, d) for k, d in folds]
    metrics = ("pseudo_dice_train", "seg_test_dice", "seg_test_iou", "seg_test_patient_dice_mean")
    overall = {m: _mean_sd([r[m] for r in rows]) for m in metrics}
    per_patient: dict[str, np.ndarray] = {}
    for _, d in folds:
        for group, c in patient_counts(d).items():
            if group in per_patient:  # a patient tested twice: the folds overlap
                raise ValueError(f"{run_root}: patient {group} is a test patient of two folds")
            per_patient[group] = c
    boot = None
    if per_patient:
        groups = sorted(per_patient)
        boot = bootstrap_interval(np.stack([per_patient[g] for g in groups]), seed=seed)
        boot["patient_dice"] = {
            g: float(v)
            for g, v in zip(
                groups, patient_dice(np.stack([per_patient[g] for g in groups])), strict=True
            )
        }
    summary = {"run": str(run_root), "folds": rows, "mean_sd": overall, "bootstrap": boot}
    write_json_atomic(run_root / "cv_summary.json", summary)
    write_text_atomic(run_root / "cv_summary.md", render(summary))
    return run_root / "cv_summary.json", run_root / "cv_summary.md"


def _f(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}"


def render(summary: dict[str, Any]) -> str:
    rows = summary["folds"]
    lines = [
        f"# Cross-validation by patient: {len(rows)} folds",
        "",
        "| fold | pseudo-mask Dice (train) | calibrated | seg test Dice | seg test IoU | per-patient Dice |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['fold']} | {_f(r['pseudo_dice_train'])} | {'yes' if r['calibrated'] else 'no'} | "
            f"{_f(r['seg_test_dice'])} | {_f(r['seg_test_iou'])} | {_f(r['seg_test_patient_dice_mean'])} |"
            + ("" if r["complete"] else " (incomplete)")
        )
    ms = summary["mean_sd"]
    cells = [
        f"{_f(ms[m]['mean'])} ± {_f(ms[m]['sd'])}"
        for m in (
            "pseudo_dice_train",
            "seg_test_dice",
            "seg_test_iou",
            "seg_test_patient_dice_mean",
        )
    ]
    lines.append(f"| **mean ± sd** | {cells[0]} | | {cells[1]} | {cells[2]} | {cells[3]} |")
    boot = summary.get("bootstrap")
    if boot:
        lo, hi = boot["dice_interval"]
        plo, phi = boot["patient_dice_interval"]
        lines += [
            "",
            f"Test patients of all folds pooled ({boot['patients']} patients, each tested once): "
            f"segmenter Dice {_f(boot['dice'])}, patient-level bootstrap {int(boot['level'] * 100)} % "
            f"interval [{_f(lo)}, {_f(hi)}] ({boot['resamples']} resamples); mean per-patient Dice "
            f"{_f(boot['patient_dice_mean'])} [{_f(plo)}, {_f(phi)}].",
        ]
    return "\n".join(lines) + "\n"


def summarize_sweep_runs(run_dirs: Sequence[str | Path]) -> list[Path]:
    """After a multirun: summarize each run whose jobs wrote fold directories."""
    roots = sorted({Path(d).parent for d in run_dirs if FOLD_DIR.match(Path(d).name)})
    written = []
    for root in roots:
        out = summarize(root)
        if out is not None:
            written.append(out[1])
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m camseg.cv", description="Cross-validation summary of <run>/fold<k>."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summarize", help="(re)write <run>/cv_summary.{json,md}")
    s.add_argument("run_dir", type=Path, help="the run directory holding fold0, fold1, ...")
    s.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    args = parser.parse_args(argv)
    out = summarize(args.run_dir, seed=args.seed)
    if out is None:
        print(f"camseg.cv: error: no fold<k> directories under {args.run_dir}", file=sys.stderr)
        return 2
    print(out[1].read_text(encoding="utf-8"))
    print(f"camseg.cv: summary written to {out[0]} and {out[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
