"""The case-by-case part of the report: ``seg/cases.json``, the per-patient table, detection at
the slice, patient and lesion level, boundary metrics, the detection ROC and ``report.html``."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from camseg.audit import report as audit_report
from camseg.data.folder import load_index
from camseg.errors import CamsegError
from camseg.report_html import REPORT_HTML, write_html_report
from camseg.rundir import RunDir
from camseg.seg.cases import CASES_JSON, VAL_CASES_JSON, VAL_PREDICTIONS, evaluate_predictions
from camseg.utils.io import pyplot, read_json, save_figure_atomic, write_json_atomic

log = logging.getLogger("camseg")
ROC_PNG = "detection_roc.png"


def _f(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def load_or_evaluate(
    run: RunDir, root: Path, classes: list[str], split: str = "test"
) -> dict[str, Any] | None:
    """``seg/cases.json`` (test) or ``seg/cases_val.json`` (validation), recomputed when
    missing or older than the segmenter's metrics."""
    pred_dir = run.seg / ("predictions" if split == "test" else VAL_PREDICTIONS)
    if not pred_dir.is_dir():
        return None
    out = run.seg / (CASES_JSON if split == "test" else VAL_CASES_JSON)
    metrics = run.seg / "metrics.json"
    if out.is_file() and metrics.is_file() and out.stat().st_mtime_ns >= metrics.stat().st_mtime_ns:
        return read_json(out)
    index = load_index(root, classes, check_files=False, require_positive=False)
    cases = evaluate_predictions(pred_dir, index, index.samples)
    write_json_atomic(out, cases)
    return cases


def _roc_png(path: Path, summary: dict[str, Any]) -> bool:
    curves = {k: v["roc"] for k, v in summary.items() if v["roc"]["fpr"]}
    if not curves:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    for name, roc in curves.items():
        ax.plot(roc["fpr"], roc["tpr"], marker=".", label=f"{name} (AUROC {roc['auroc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("false positive rate (normal test slices)")
    ax.set_ylabel("true positive rate (lesion slices)")
    ax.set_title("slice detection, score = predicted area")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure_atomic(path, fig, dpi=100)
    return True


def _patient_table(cases: dict[str, Any]) -> list[str]:
    lines = [
        "| patient | class | slices (with lesion) | Dice | IoU | lesion area true / predicted (px) "
        "| HD95 (px) | surface Dice | lesions found / false | detection |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in cases["patients"]:
        lines.append(
            f"| {r['patient']} | {r['class']} | {r['slices']} ({r['positive_slices']}) | {_f(r['dice'])} "
            f"| {_f(r['iou'])} | {r['gt_pixels']} / {r['pred_pixels']} | {_f(r['hd95_mean'], 1)} "
            f"| {_f(r['surface_dice_mean'])} | {r['lesions_hit']}/{r['lesions']} / {r['false_lesions']} | {r['detection']} |"
        )
    return lines


def case_lines(run: RunDir, manifest: dict[str, Any] | None) -> list[str]:
    """Markdown for report.md (and, as a side effect, ``seg/cases.json``, the ROC and report.html)."""
    if not manifest:
        return []
    root, classes = Path(manifest["dataset"]["root"]), list(manifest["dataset"]["classes"])
    try:
        cases = load_or_evaluate(run, root, classes)
        val_cases = load_or_evaluate(run, root, classes, "val")
    except (CamsegError, OSError, ValueError) as e:
        log.warning("case-by-case evaluation skipped: %s", e)
        return ["", f"Case-by-case evaluation skipped: {e}"]
    if not cases or not cases["images"]:
        return []
    tol = cases["images"][0]["tolerance_px"]
    lines = [
        "",
        f"### Test cases ({cases['num_images']} images with ground truth)",
        "",
        "Detection: a slice (patient) is predicted positive when the segmenter marks at least "
        f"{cases['min_detect_pixels']} pixel(s) of the class on it (any of its slices). HD95: 95th-percentile "
        "Hausdorff distance of lesion slices found (MONAI's convention, torchmetrics' boundary distances); "
        f"surface Dice at a tolerance of {tol:g} px ({100 * cases['surface_tolerance']:g} % of the image side).",
        "",
        "| class | slice sensitivity / specificity | patient sensitivity / specificity | lesions found | false lesions | HD95 (px) | surface Dice | detection AUROC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in cases["summary"].items():
        lines.append(
            f"| {name} | {_f(s['slice_sensitivity'])} / {_f(s['slice_specificity'])} "
            f"| {_f(s['patient_sensitivity'])} / {_f(s['patient_specificity'])} "
            f"| {s['lesions_hit']}/{s['lesions']} | {s['false_lesions']} | {_f(s['hd95_mean'], 1)} "
            f"| {_f(s['surface_dice_mean'])} | {_f(s['roc']['auroc'])} |"
        )
    lines += ["", "Test patients, worst Dice first:", "", *_patient_table(cases)]
    if val_cases and val_cases["images"]:
        lines += [
            "",
            f"Validation patients ({val_cases['num_images']} images with ground truth; they chose "
            "the segmenter's best epoch), worst Dice first:",
            "",
            *_patient_table(val_cases),
        ]
    if _roc_png(run.seg / ROC_PNG, cases["summary"]):
        lines += ["", f"![detection ROC](seg/{ROC_PNG})"]
    try:
        write_html_report(
            run.root / REPORT_HTML,
            f"camseg cases: {run.name}",
            root,
            classes,
            cases,
            run.seg / "predictions",
            run.pseudo if run.pseudo.is_dir() else None,
            manifest.get("samples", []),
            preface=audit_report.html_section(audit_report.load(run), run.stage("audit")),
        )
        lines += [
            "",
            f"Every test case, worst first, with filters: [{REPORT_HTML}]({REPORT_HTML}).",
        ]
    except (OSError, ValueError) as e:
        log.warning("report.html not written: %s", e)
    return lines


__all__ = ["case_lines", "load_or_evaluate"]
