"""The audit's section of report.md: the headline first, then the methods side by side."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from camseg.rundir import RunDir
from camseg.utils.io import read_json


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.0%}"


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def load(run: RunDir) -> dict[str, Any] | None:
    path = run.stage("audit") / "audit.json"
    try:
        return read_json(path) if path.is_file() else None
    except (OSError, ValueError):
        return None


def section(run: RunDir) -> list[str]:
    """Markdown lines of the audit section; [] when the run has no audit."""
    doc = load(run)
    if not doc:
        return []
    h = doc["headline"]
    ds = doc["dataset"]
    lines = [
        "## Audit: where the classifier looks",
        "",
        f"{ds['images']} positive images ({ds['split']} split), CAM `{h['method']}` as stage 2 makes it.",
        "",
        "| energy inside the lesion | pointing game | energy outside the body | shortcut |",
        "|---|---|---|---|",
        f"| {_pct(h['energy_pointing'])} | {_pct(h['pointing_game'])} | "
        f"{_pct(h['out_of_body_share'])} | {'**flagged**' if h['shortcut'] else 'none flagged'} |",
        "",
    ]
    if h["shortcut"]:
        lines += [
            "**Warning: the classifier may rest on a shortcut** — "
            + "; ".join(h["shortcut_reasons"])
            + ". Pseudo-masks made from these CAMs may mark it instead of the lesion; "
            "see `audit/audit.json` (`flagged_maps`).",
            "",
        ]
    methods = doc["methods"]
    lines += [
        "| method | energy in lesion | pointing | outside body | deletion AUC ↓ | insertion AUC ↑ | avg drop ↓ | increase ↑ | shortcut |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        f = m.get("faithfulness") or {}
        loc, anat, sc = m["localisation"], m["anatomy"], m["shortcut"]
        flag = ("yes" + (f" ({sc['corner']})" if sc["corner"] else "")) if sc["flagged"] else "no"
        lines.append(
            f"| {name} | {_pct(loc['energy_pointing'])} | {_pct(loc['pointing_game'])} | "
            f"{_pct(anat['out_of_body_share'])} | {_num(f.get('deletion_auc'))} | "
            f"{_num(f.get('insertion_auc'))} | {_pct(f.get('average_drop'))} | "
            f"{_pct(f.get('increase'))} | {flag} |"
        )
    lines.append("")
    focus = doc.get("focus", {}).get(h["method"])
    if focus:
        lines += [
            "Mean normalised CAM per class (rows), on images whose class the classifier "
            "predicts (left) or misses (right):",
            "",
            f"![outcome focus](audit/{focus['image']})",
            "",
        ]
    return lines


def html_section(doc: dict[str, Any] | None, audit_dir: Path) -> str:
    """The audit's headline for ``report.html``: the same figures as :func:`section`, the
    shortcut warning, and the outcome-focus image inlined (the page stays one file)."""
    if not doc:
        return ""
    h = doc["headline"]
    esc = html.escape
    parts = [
        "<h2>Audit: where the classifier looks</h2>",
        f"<p>CAM <code>{esc(str(h['method']))}</code> on {doc['dataset']['images']} positive "
        f"images ({esc(str(doc['dataset']['split']))} split): energy inside the lesion "
        f"{_pct(h['energy_pointing'])}, pointing game {_pct(h['pointing_game'])}, energy "
        f"outside the body {_pct(h['out_of_body_share'])}.</p>",
    ]
    if h["shortcut"]:
        reasons = "; ".join(str(r) for r in h["shortcut_reasons"])
        parts.append(
            '<p class="fn"><b>Warning: the classifier may rest on a shortcut</b> — '
            f"{esc(reasons)}. Pseudo-masks made from these CAMs may mark it instead of the lesion.</p>"
        )
    else:
        parts.append("<p>No shortcut flagged.</p>")
    focus = doc.get("focus", {}).get(h["method"])
    path = audit_dir / str(focus["image"]) if focus else None
    if path is not None and path.is_file():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(
            '<p>Mean normalised CAM per class, predicted (left) vs missed (right):</p><img alt="outcome focus" '
            f'style="width:auto;max-width:100%" src="data:image/png;base64,{data}">'
        )
    return "\n".join(parts)
