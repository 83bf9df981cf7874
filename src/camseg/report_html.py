"""``report.html``: every test case on one self-contained page, worst first, for auditing.

One file, no server and no internet: images are inlined as base64 PNGs (drawn at most
``THUMB`` pixels on their longer side), the filters are a few lines of inline script.
Rows: every test image with ground truth — image | prediction | ground truth, with Dice,
HD95 and its error type (false negatives, false positives on normal slices, true
positives, true negatives) — then the training pseudo-masks with the lowest Dice —
image | CAM | pseudo-mask | ground truth. Filters: patient, error type, part.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from camseg.constants import IGNORE_INDEX
from camseg.utils.io import png_bytes, read_image, read_mask, write_text_atomic
from camseg.utils.large import resize_area, resize_nearest
from camseg.utils.overlay import GT_COLOUR, cam_overlay, draw_contours, to_rgb

REPORT_HTML = "report.html"
THUMB = 192
ERROR_NAMES = {
    "fn": "missed lesion",
    "fp": "false positive",
    "tp": "lesion found",
    "tn": "correct negative",
}

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{padding:4px 8px;border-bottom:1px solid #ddd;vertical-align:top}
img{display:block;image-rendering:pixelated;width:160px}
.meta{font-size:0.9em;max-width:22em}.fn{color:#b00}.fp{color:#b60}.tp{color:#070}.tn{color:#555}
#filters{position:sticky;top:0;background:#fff;padding:0.5em 0;border-bottom:2px solid #888}
"""
_SCRIPT = """
function applyFilters(){
  const p=document.getElementById('patient').value, e=document.getElementById('error').value,
        s=document.getElementById('part').value;
  let shown=0;
  for(const row of document.querySelectorAll('tr.case')){
    const ok=(!p||row.dataset.patient===p)&&(!e||row.dataset.error===e)&&(!s||row.dataset.part===s);
    row.style.display=ok?'':'none'; if(ok){shown++;}
  }
  document.getElementById('shown').textContent=String(shown);
}
document.addEventListener('DOMContentLoaded',()=>{
  for(const id of ['patient','error','part']){document.getElementById(id).addEventListener('change',applyFilters);}
  applyFilters();
});
"""


def _thumb(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = min(1.0, THUMB / max(h, w))
    return resize_area(rgb, max(1, round(h * scale)), max(1, round(w * scale)))


def _img(rgb: np.ndarray, alt: str) -> str:
    data = base64.b64encode(png_bytes(_thumb(rgb))).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _contours(rgb: np.ndarray, mask: np.ndarray, gt: bool = False) -> np.ndarray:
    if mask.shape != rgb.shape[:2]:
        mask = resize_nearest(mask, *rgb.shape[:2])
    return draw_contours(rgb, mask, colour=np.array(GT_COLOUR) if gt else None)


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return f"{v:.{digits}f}"


def _test_rows(
    root: Path, cases: dict[str, Any], pred_dir: Path, class_names: list[str]
) -> Iterable[str]:
    for im in cases["images"]:
        rgb = to_rgb(read_image(root / im["image"]))
        pred = read_mask(pred_dir / f"{im['id']}.png")
        gt = read_mask(root / im["mask"])
        worst = min(im["classes"], key=lambda c: c["dice"])
        error = next(
            (c["error"] for c in im["classes"] if c["error"] in ("fn", "fp")), worst["error"]
        )
        meta = "<br>".join(
            f"{html.escape(n)}: Dice {_fmt(c['dice'])}, HD95 {_fmt(c['hd95'], 1)} px, "
            f"truth {c['gt_pixels']} px, predicted {c['pred_pixels']} px, "
            f"lesions {c['hit']}/{c['lesions']} found, {c['false']} false"
            for n, c in zip(class_names, im["classes"], strict=True)
        )
        yield (
            f'<tr class="case" data-patient="{html.escape(im["patient"])}" data-error="{error}" data-part="test">'
            f'<td class="meta"><b>{html.escape(im["id"])}</b><br>patient {html.escape(im["patient"])}<br>'
            f'<span class="{error}">{ERROR_NAMES[error]}</span><br>{meta}</td>'
            f"<td>{_img(rgb, 'image')}</td><td></td>"
            f"<td>{_img(_contours(rgb, pred), 'prediction')}</td>"
            f"<td>{_img(_contours(rgb, gt, gt=True), 'ground truth')}</td></tr>"
        )


def _train_rows(root: Path, pseudo_dir: Path, train_cases: list[dict[str, Any]]) -> Iterable[str]:
    for c in train_cases:
        rgb = to_rgb(read_image(root / c["image"]))
        mask = read_mask(pseudo_dir / "masks" / f"{c['id']}.png")
        gt = read_mask(root / c["mask"])
        cam_file = pseudo_dir / "cams" / f"{c['id']}.npz"
        cam_cell = ""
        if cam_file.is_file():
            with np.load(cam_file, allow_pickle=False) as z:
                cams = z[z.files[0]].astype(np.float32)
            cam = cams.max(axis=0) if cams.ndim == 3 else cams
            if cam.shape != rgb.shape[:2]:
                cam = resize_area(cam, *rgb.shape[:2])
            cam_cell = _img(cam_overlay(rgb, cam), "CAM")
        error = c["error"]
        yield (
            f'<tr class="case" data-patient="{html.escape(c["patient"])}" data-error="{error}" data-part="train">'
            f'<td class="meta"><b>{html.escape(c["id"])}</b><br>patient {html.escape(c["patient"])} (training)<br>'
            f'<span class="{error}">{ERROR_NAMES[error]}</span><br>pseudo-mask Dice {_fmt(c["dice"])}</td>'
            f"<td>{_img(rgb, 'image')}</td><td>{cam_cell}</td>"
            f"<td>{_img(_contours(rgb, mask), 'pseudo-mask')}</td>"
            f"<td>{_img(_contours(rgb, gt, gt=True), 'ground truth')}</td></tr>"
        )


def worst_pseudo_masks(
    root: Path, pseudo_dir: Path, samples: list[dict[str, Any]], limit: int
) -> list[dict[str, Any]]:
    """Training samples with ground truth, by pseudo-mask Dice (all classes pooled), worst first."""
    from camseg.seg.cases import error_type

    out = []
    for s in samples:
        mpath = pseudo_dir / "masks" / f"{s['id']}.png"
        if not s.get("mask") or not mpath.is_file():
            continue
        pm, gt = read_mask(mpath), read_mask(root / s["mask"])
        valid = gt != IGNORE_INDEX
        p, g = (pm > 0) & (pm != IGNORE_INDEX) & valid, (gt > 0) & valid
        inter, total = int((p & g).sum()), int(p.sum() + g.sum())
        dice = 1.0 if total == 0 else 2 * inter / total
        out.append(
            {
                **s,
                "patient": s.get("group", ""),
                "dice": dice,
                "error": error_type(bool(g.any()), bool(p.any())),
            }
        )
    out.sort(key=lambda r: (r["dice"], r["id"]))
    return out[:limit]


def write_html_report(
    out: Path,
    title: str,
    root: Path,
    class_names: list[str],
    cases: dict[str, Any] | None,
    pred_dir: Path | None,
    pseudo_dir: Path | None = None,
    train_samples: list[dict[str, Any]] | None = None,
    train_limit: int = 48,
    preface: str = "",
) -> Path:
    """Write the page; returns its path. ``cases`` as :func:`camseg.seg.cases.evaluate_predictions`
    gives; ``preface``: HTML placed before the cases (the audit's headline)."""
    rows: list[str] = []
    if cases and pred_dir is not None:
        rows += _test_rows(root, cases, pred_dir, class_names)
    train = (
        worst_pseudo_masks(root, pseudo_dir, train_samples or [], train_limit) if pseudo_dir else []
    )
    rows += _train_rows(root, pseudo_dir, train) if pseudo_dir else []
    patients = sorted({r.split('data-patient="', 1)[1].split('"', 1)[0] for r in rows})
    options = "".join(f'<option value="{p}">{p}</option>' for p in patients)
    errors = "".join(f'<option value="{k}">{v}</option>' for k, v in ERROR_NAMES.items())
    n_test = len(cases["images"]) if cases else 0
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body><h1>{html.escape(title)}</h1>
{preface}
<p>{n_test} test images with ground truth, worst Dice first, then the {len(train)} training pseudo-masks
with the lowest Dice. Contours: prediction / pseudo-mask in the class colour, ground truth in yellow.</p>
<div id="filters">patient <select id="patient"><option value="">all</option>{options}</select>
error <select id="error"><option value="">all</option>{errors}</select>
part <select id="part"><option value="">all</option><option value="test">test</option><option value="train">training pseudo-masks</option></select>
&nbsp;showing <span id="shown">{len(rows)}</span> of <span id="total">{len(rows)}</span></div>
<table><thead><tr><th>case</th><th>image</th><th>CAM</th><th>prediction / pseudo-mask</th><th>ground truth</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table><script>{_SCRIPT}</script></body></html>
"""
    write_text_atomic(out, page)
    return out


__all__ = ["REPORT_HTML", "worst_pseudo_masks", "write_html_report"]
