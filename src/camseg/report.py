"""``report.md``: the experiment on one page (metrics tables, timings, figures)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from camseg import fingerprint
from camseg.audit.report import section as audit_section
from camseg.errors import CamsegError
from camseg.pseudo.audit_check import report_lines as shortcut_lines
from camseg.pseudo.coverage import coverage_problem, empty_classes
from camseg.report_cases import case_lines
from camseg.rundir import RunDir
from camseg.utils.io import read_json, sha256_file, write_text_atomic

log = logging.getLogger("camseg")
SMOKE_BANNER = (
    "**Smoke test (`debug=fast`): a tiny dataset, one epoch per stage. The numbers below only "
    "show that the pipeline runs; they say nothing about any method (an AUROC of NaN or 0.0 "
    "here is expected).**"
)


def _load(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.is_file() else None


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _stale(run: RunDir, pseudo_done: bool, seg_done: bool) -> dict[str, str]:
    """Finished stages whose upstream was redone since: their numbers are not of the
    artifacts now beside them."""
    out: dict[str, str] = {}
    if pseudo_done and run.cls_best.is_file():
        why = fingerprint.stale_inputs(
            run.pseudo, {fingerprint.CLS_CHECKPOINT: sha256_file(run.cls_best)}
        )
        if why:
            out["pseudo"] = why
    if seg_done:
        why = fingerprint.stale_inputs(
            run.seg, {fingerprint.MANIFEST: fingerprint.manifest_digest(run.manifest)}
        )
        if why:
            out["seg"] = why
    return out


def _stale_note(stale: dict[str, str], stage: str) -> list[str]:
    if stage not in stale:
        return []
    return [f"**Stale**: {stale[stage]}; `stages=[{stage}] force=true` redoes it.", ""]


def _config_section(run: RunDir, done: dict[str, Any]) -> list[str]:
    """Each finished stage's settings as its fingerprint recorded them, never this
    invocation's config: a stage reused as it was must not be shown beside other values."""
    lines = [
        "## Config",
        "",
        "The settings and inputs each stage was made with, from its `fingerprint.json` "
        "(keys that change no result, such as loader workers, are left out).",
        "",
    ]
    for stage, stage_dir in (("cls", run.cls), ("pseudo", run.pseudo), ("seg", run.seg)):
        if not done[stage]:
            continue
        lines += [f"### {stage}", ""]
        try:
            fp = fingerprint.read(stage_dir)
        except CamsegError as e:
            lines += [f"Unreadable: {e}", ""]
            continue
        if fp is None:
            lines += [
                f"Not recorded: made before camseg recorded fingerprints "
                f"(`{stage}/{'provenance.json' if stage == 'pseudo' else 'config.yaml'}` "
                "holds what it was started with).",
                "",
            ]
            continue
        body = ["# inputs (sha256)", *(f"{k}: {json.dumps(v)}" for k, v in fp.inputs.items())]
        body += ["# config", *(f"{k}: {json.dumps(v)}" for k, v in sorted(fp.config.items()))]
        lines += ["```yaml", *body, "```", ""]
    return lines


def _update_timings(run: RunDir, timings: dict[str, float]) -> dict[str, Any]:
    """Merge this invocation's stage wall times into ``timings.json``; all of them."""
    tpath = run.root / "timings.json"
    all_timings = _load(tpath) or {}
    all_timings.update({k: round(v, 1) for k, v in timings.items()})
    from camseg.utils.io import write_json_atomic

    write_json_atomic(tpath, all_timings)
    return all_timings


def _status_table(
    run: RunDir, all_timings: dict[str, Any], stale: dict[str, str], done: dict[str, Any]
) -> list[str]:
    """One row per stage: not run, done or stale, and its wall time; ``done``: the results of
    cls, pseudo and seg (None when not run)."""
    lines = ["| stage | status | wall time (s) |", "|---|---|---|"]
    audited = (run.stage("audit") / "audit.json").is_file()
    for stage in ("cls", "audit", "pseudo", "seg"):
        ran = audited if stage == "audit" else done[stage]
        t = all_timings.get(stage)
        wall = "–" if t is None else f"{float(t):.1f}"
        status = "not run" if not ran else f"stale: {stale[stage]}" if stage in stale else "done"
        lines.append(f"| {stage} | {status} | {wall} |")
    lines.append("")
    return lines


def _cls_section(cls_m: dict[str, Any]) -> list[str]:
    lines = [
        "## Stage 1: classifier",
        "",
        f"Best checkpoint by `{cls_m['monitor']}` after {cls_m['epochs']} epochs; patients per split: {cls_m['patients']}. "
        "F1 and accuracy are taken at the operating threshold: probability 0.5 per class "
        "(multi-label, binary) or the highest-scoring class (multi-class); AUROC and AP over all thresholds.",
        "",
    ]
    lines += ["| metric | val | test |", "|---|---|---|"]
    for key in ("auroc", "ap", "f1", "acc", "loss"):
        lines.append(
            f"| {key} | {_fmt(cls_m['val'].get(f'val/{key}'))} | {_fmt(cls_m['test'].get(f'test/{key}'))} |"
        )
    lines.append("")
    return lines


def _pseudo_section(
    run: RunDir, manifest: dict[str, Any], quality: dict[str, Any] | None, stale: dict[str, str]
) -> list[str]:
    cam = manifest["cam"]
    pol = manifest["policy"]
    lines = [
        "## Stage 2: pseudo-masks",
        "",
        *_stale_note(stale, "pseudo"),
        f"{len(manifest['samples'])} samples ({manifest['dataset']['split']} split); CAM `{cam['method']}` at `{cam.get('target_layer', 'each member layer')}`, "
        f"scales {cam['scales']}, flip {cam['flip']}; fg_threshold {pol['fg_threshold']}, bg_threshold {pol['bg_threshold']}, "
        f"CRF {'on' if pol['crf'] else 'off'}. Classifier sha256 `{manifest['classifier']['sha256'][:16]}…`.",
        "",
    ]
    lines += calibration_lines(run, manifest.get("calibration"))
    lines += shortcut_lines(manifest)  # the audit's flag, beside the masks' quality
    if quality and "sweep" in quality:
        sw = quality["sweep"]
        lines += [
            "| pseudo-masks vs ground truth | Dice | IoU | precision | recall |",
            "|---|---|---|---|---|",
            f"| at fg_threshold={quality['fg_threshold']} (ignore = not foreground) | {_fmt(quality['dice'])} "
            f"| {_fmt(quality['iou'])} | {_fmt(quality.get('precision'))} | {_fmt(quality.get('recall'))} |",
            f"| best threshold of the sweep ({sw['best_threshold']}; "
            f"{sw.get('map', 'CRF posterior' if pol['crf'] else 'CAM')}) | {_fmt(sw['best_dice'])} | – | – | – |",
            "",
            f"Mean ignore fraction {_fmt(quality['ignore_fraction'])}; {quality['samples_with_gt']} samples with ground truth.",
            "",
            "![threshold sweep](pseudo/threshold_sweep.png)",
            "",
        ]
    if quality and "coverage" in quality:
        lines += _coverage_lines(quality["coverage"])
    return lines


def _seg_section(
    run: RunDir,
    seg_m: dict[str, Any],
    quality: dict[str, Any] | None,
    manifest: dict[str, Any] | None,
    stale: dict[str, str],
) -> list[str]:
    test = seg_m.get("test", {})
    lines = [
        "## Stage 3: segmenter",
        "",
        *_stale_note(stale, "seg"),
        f"`{seg_m.get('arch')}` / `{seg_m.get('encoder')}`, monitor `{seg_m.get('monitor')}`, {seg_m.get('epochs')} epochs.",
        "",
    ]
    lines += [
        "| test patients vs ground truth | Dice | IoU | sensitivity | precision |",
        "|---|---|---|---|---|",
    ]
    lines.append(
        f"| segmenter | {_fmt(test.get('test/dice'))} | {_fmt(test.get('test/iou'))} | {_fmt(test.get('test/sensitivity'))} | {_fmt(test.get('test/precision'))} |"
    )
    if "test/dice_patient_mean" in test:
        lines.append("")
        lines.append(
            f"Per patient Dice: {_fmt(test['test/dice_patient_mean'])} ± {_fmt(test.get('test/dice_patient_std'))}."
        )
    lines += _rounds_lines(seg_m)
    if quality and "dice" in quality:
        lines += [
            "",
            "Pseudo-masks alone vs segmenter (Dice vs ground truth):",
            "",
            "| | Dice |",
            "|---|---|",
        ]
        lines.append(
            f"| pseudo-masks (training patients, fg_threshold) | {_fmt(quality['dice'])} |"
        )
        if "train_pseudo_vs_seg" in seg_m:
            lines.append(
                f"| segmenter on the same training images | {_fmt(seg_m['train_pseudo_vs_seg'].get('dice'))} |"
            )
        lines.append(f"| segmenter (test patients) | {_fmt(test.get('test/dice'))} |")
    lines += case_lines(run, manifest)
    if (run.seg / "figure_grid.png").is_file():
        lines += [
            "",
            "Image / CAM / pseudo-mask / segmenter prediction / ground truth (yellow), "
            "training patients:",
            "",
            "![grid](seg/figure_grid.png)",
        ]
    lines.append("")
    return lines


def _rounds_lines(seg_m: dict[str, Any]) -> list[str]:
    """The self-training rounds (seg.rounds), and a note when an earlier round was better."""
    if not seg_m.get("rounds"):
        return []
    monitor = seg_m.get("monitor")
    lines = ["", f"| self-training round | {monitor} | test/dice |", "|---|---|---|"]
    for r in seg_m["rounds"]:
        lines.append(f"| {r['round']} | {_fmt(r.get(monitor))} | {_fmt(r.get('test/dice'))} |")
    best = seg_m.get("best_round_by_val")
    if best is not None and best != seg_m.get("round"):
        lines += [
            "",
            f"Self-training did not help on validation: round {best} is best "
            f"(its model: `seg/round{best}/checkpoints/best.ckpt`; `seg.rounds={best}` keeps it).",
        ]
    return lines


def write_report(cfg: DictConfig, run: RunDir, timings: dict[str, float]) -> Path | None:
    """Write ``run/report.md`` from the artifacts present; also keep ``timings.json`` up to date."""
    if not run.root.is_dir():
        return None
    all_timings = _update_timings(run, timings)
    cls_m = _load(run.cls / "metrics.json")
    quality = _load(run.pseudo / "quality.json")
    manifest = _load(run.manifest)
    seg_m = _load(run.seg / "metrics.json")
    lines = [f"# camseg report: `{run.name}`", ""]
    if cfg.get("smoke_test"):
        lines += [SMOKE_BANNER, ""]
        log.warning(SMOKE_BANNER.replace("**", ""))
    stale = _stale(run, manifest is not None, seg_m is not None)
    done = {"cls": cls_m, "pseudo": manifest, "seg": seg_m}
    lines += _status_table(run, all_timings, stale, done)
    lines += _warning_lines(cfg, quality, manifest, seg_m)
    if cls_m:
        lines += _cls_section(cls_m)
    lines += audit_section(run)  # where the classifier looks, before the masks built from it
    if manifest:
        lines += _pseudo_section(run, manifest, quality, stale)
    if seg_m:
        lines += _seg_section(run, seg_m, quality, manifest, stale)
    lines += _config_section(run, done)
    write_text_atomic(run.report, "\n".join(lines))
    return run.report


def _warning_lines(
    cfg: DictConfig,
    quality: dict[str, Any] | None,
    manifest: dict[str, Any] | None,
    seg_m: dict[str, Any] | None,
) -> list[str]:
    """Loud failures, at the top of the page: uncovered pseudo-masks, a segmenter that predicts nothing."""
    found: list[str] = []
    if quality and manifest and "coverage" in quality:
        min_cov = float(cfg.get("pseudo", {}).get("min_positive_coverage", 0.0) or 0.0)
        problem = coverage_problem(quality["coverage"], min_cov, manifest.get("policy"))
        if problem:
            stopped = "the run stopped after stage 2: " if not seg_m else ""
            found.append(f"**Pseudo-masks:** {stopped}{problem}.")
        elif empty_classes(quality["coverage"]):
            found.append(
                f"**Pseudo-masks:** no pseudo-mask has any foreground of {empty_classes(quality['coverage'])} "
                f"on a positive image (the coverage check is off: pseudo.min_positive_coverage={min_cov:g})."
            )
    for w in (seg_m or {}).get("warnings", []):
        found.append(f"**Segmenter:** {w}.")
    if not found:
        return []
    return ["## Warnings", "", *(f"- {w}" for w in found), ""]


def _pct(d: dict[str, float] | None) -> str:
    if d is None:
        return "–"
    return " / ".join(f"{100 * d[k]:.2g}" for k in ("p10", "median", "p90"))


def _coverage_lines(coverage: dict[str, Any]) -> list[str]:
    lines = [
        "| class | positives | with foreground | positive coverage | pseudo-mask area % (p10 / median / p90) "
        "| CAM ≥ fg_threshold area % | truth area % | ignore on positives / negatives |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in coverage["per_class"].items():
        ip, ineg = c["ignore_fraction_positives"], c["ignore_fraction_negatives"]
        lines.append(
            f"| {name} | {c['positives']} | {c['with_foreground']} | {_fmt(c['positive_coverage'])} "
            f"| {_pct(c['pseudo_area'])} | {_pct(c['cam_support_area'])} | {_pct(c.get('gt_area'))} "
            f"| {_fmt(ip)} / {_fmt(ineg)} |"
        )
    lines += [
        "",
        "Coverage of the positive images: areas are shares of the image; the CAM area is measured "
        "before CRF refinement and small-blob clean-up.",
        "",
    ]
    return lines


__all__ = ["write_report"]


def calibration_lines(run: RunDir, summary: dict[str, Any] | None) -> list[str]:
    """The policy calibration on the validation patients (pseudo.calibrate), or its absence."""
    if not summary:
        return []
    if summary.get("status") != "calibrated":
        return [
            f"**Policy NOT calibrated** (pseudo.calibrate): {summary.get('reason')}; the configured "
            "policy was applied.",
            "",
        ]
    from camseg.pseudo.calibrate import FILENAME, PLOT, top_rows

    def policy(d: dict[str, Any]) -> str:
        crf = d.get("crf")
        return (
            f"{d.get('threshold_rule', 'absolute')} fg {d['fg_threshold']:g} / bg {d['bg_threshold']:g}, "
            f"min_component_size {d['min_component_size']:g}, "
            + ("no CRF" if not crf else f"CRF bg_power {crf['bg_power']:g}")
        )

    v = summary["validation"]
    lines = [
        "### Policy calibration on the validation patients",
        "",
        f"{summary['candidates']} policies scored on {v['images']} validation images "
        f"({v['positives']} positive, {v['patients']} patients; the test patients are never used).",
        "",
        "| policy | validation Dice |",
        "|---|---|",
        f"| configured: {policy(summary['configured'])} | {_fmt(summary['configured_val_dice'])} |",
        f"| **chosen**: {policy(summary['chosen'])} | **{_fmt(summary['val_dice'])}** |",
        "",
    ]
    path = run.pseudo / FILENAME
    record = _load(path)
    if record and record.get("table"):
        lines += [
            "| best candidates: CRF bg_power | rule | fg_threshold | min_component_size | validation Dice |",
            "|---|---|---|---|---|",
        ]
        for r in top_rows(record):
            power = "off" if r["crf_bg_power"] is None else f"{r['crf_bg_power']:g}"
            lines.append(
                f"| {power} | {r['rule']} | {r['fg_threshold']:g} | {r['min_component_size']:g} | {_fmt(r['dice'])} |"
            )
        lines += ["", f"The whole search: `pseudo/{FILENAME}`.", ""]
    if (run.pseudo / PLOT).is_file():
        lines += [f"![policy calibration](pseudo/{PLOT})", ""]
    return lines
