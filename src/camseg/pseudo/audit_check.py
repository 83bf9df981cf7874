"""Stage 2 reads the audit's shortcut verdict before it trusts the classifier's CAMs.

When ``<run>/audit/audit.json`` exists for the same classifier checkpoint and dataset
(the sha256 it records, and its fingerprint's inputs) and its dataset verdict is flagged,
stage 2 warns once, loudly, records the verdict in ``manifest.json``
(``audit_shortcut``) and ``report.md`` beside the pseudo-mask quality, or stops
(``pseudo.on_shortcut``: ``warn`` | ``error`` | ``ignore``). An audit of another
checkpoint or dataset is ignored with an info line: it says nothing about these CAMs.

The audit stage sits above stage 2 in the layers, so this reads the file, not the module.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from camseg import fingerprint
from camseg.errors import CamsegError, ConfigError
from camseg.rundir import RunDir
from camseg.utils.io import read_json

log = logging.getLogger(__name__)

MODES = ("warn", "error", "ignore")
AUDIT_JSON = "audit/audit.json"  # relative to the run directory


def on_shortcut(cfg: DictConfig) -> str:
    """``pseudo.on_shortcut`` (default ``warn``), checked."""
    mode = str(OmegaConf.select(cfg, "pseudo.on_shortcut", default="warn"))
    if mode not in MODES:
        raise ConfigError(f"pseudo.on_shortcut='{mode}': use one of {list(MODES)}")
    return mode


def _causes(verdict: dict[str, Any]) -> list[str]:
    """Machine-readable causes (``outside_body``, ``corner:<name>``, ``fixed_location:<name>``),
    derived from the sentences' fields for an audit.json written before they were recorded."""
    if verdict.get("causes"):
        return [str(c) for c in verdict["causes"]]
    causes = []
    rule = verdict.get("rule") or {}
    if verdict.get("outside_body_share", 0.0) >= rule.get("dataset_share", 0.25):
        causes.append("outside_body")
    if verdict.get("corner"):
        causes.append(f"corner:{verdict['corner']}")
    return causes


def cause_words(causes: list[str]) -> str:
    """``["corner:top-left", "outside_body"]`` -> ``"the top-left corner; outside the body"``."""
    words = []
    for c in causes:
        kind, _, where = c.partition(":")
        if kind == "outside_body":
            words.append("outside the body")
        elif kind == "fixed_location":
            words.append(f"a fixed spot in the {where} corner across images")
        else:
            words.append(f"the {where} corner")
    return "; ".join(dict.fromkeys(words)) or "unnamed"


def audit_shortcut(
    run: RunDir, inputs: dict[str, str | None], method: str
) -> dict[str, Any] | None:
    """The audit's flagged verdict for these CAMs, or None (no audit, another classifier or
    dataset, or nothing flagged).

    Args:
        run: the run directory.
        inputs: stage 2's input digests (``fingerprint.CLS_CHECKPOINT``, ``LABELS``).
        method: stage 2's ``cam.method``; its verdict when the audit measured it, else the
            audit's headline method's.
    """
    path = run.root / AUDIT_JSON
    if not path.is_file():
        return None
    try:
        doc = read_json(path)
        recorded = doc["classifier"]["sha256"]
        methods = doc["methods"]
        used = method if method in methods else doc["headline"]["method"]
        verdict = methods[used]["shortcut"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("stage pseudo: %s is unreadable (%s); its verdict is not checked", path, e)
        return None
    if recorded != inputs.get(fingerprint.CLS_CHECKPOINT):
        log.info("stage pseudo: %s audits another classifier checkpoint; not used", path)
        return None
    stale = fingerprint.stale_inputs(
        path.parent, {fingerprint.LABELS: inputs.get(fingerprint.LABELS)}
    )
    if stale is not None:
        log.info("stage pseudo: %s was %s; not used", path, stale)
        return None
    if not verdict.get("flagged"):
        return None
    return {
        "audit": AUDIT_JSON,
        "method": used,
        "causes": _causes(verdict),
        "corner": verdict.get("corner"),
        "reasons": list(verdict.get("reasons", [])),
    }


def check_audit(
    cfg: DictConfig, run: RunDir, inputs: dict[str, str | None]
) -> dict[str, Any] | None:
    """Warn (or stop, per ``pseudo.on_shortcut``) when the audit flagged a shortcut; return
    the verdict for the manifest (None when there is none to record, or with ``ignore``)."""
    mode = on_shortcut(cfg)
    if mode == "ignore":
        return None
    found = audit_shortcut(run, inputs, str(cfg.cam.method))
    if found is None:
        return None
    what = (
        f"the audit ({found['audit']}, CAM {found['method']}) flagged a shortcut of the stage-1 "
        f"classifier: {cause_words(found['causes'])} ({'; '.join(found['reasons'])})"
    )
    if mode == "error":
        raise CamsegError(
            f"stage pseudo: {what}; pseudo.on_shortcut=error stops here: retrain the classifier "
            "without the cue, or set pseudo.on_shortcut=warn to build the masks anyway"
        )
    log.warning(
        "stage pseudo: SHORTCUT WARNING: %s. Pseudo-masks made from its CAMs may mark the cue "
        "instead of the lesion (pseudo.on_shortcut=error stops instead, =ignore silences this)",
        what,
    )
    return found


def report_lines(manifest: dict[str, Any]) -> list[str]:
    """report.md's lines for the manifest's ``audit_shortcut`` (none when absent)."""
    found = manifest.get("audit_shortcut")
    if not found:
        return []
    return [
        f"**Warning: the audit flagged a shortcut of the classifier these masks come from** "
        f"(CAM `{found['method']}`: {cause_words(found['causes'])}) — "
        + "; ".join(found["reasons"])
        + ". The pseudo-masks may mark the cue instead of the lesion.",
        "",
    ]
