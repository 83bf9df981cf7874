"""Stage 2 reads the audit's shortcut verdict: warns and records it, stops, or stays quiet."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from camseg import fingerprint
from camseg.errors import CamsegError, ConfigError
from camseg.pipeline import run_pipeline
from camseg.pseudo.audit_check import audit_shortcut, cause_words, check_audit, on_shortcut
from camseg.rundir import RunDir
from camseg.utils.io import sha256_file
from test_audit_stage import make_cfg, write_classifier

# Rules that decide the verdict whatever the untrained classifier looks at: corner squares
# of half of each side cover the image, so one corner holds the peaks of at least a quarter
# of the maps (flagged); a cause must cover every map and a corner be 1e9x denser than
# average (never flagged).
FLAGGING = ("audit.shortcut.corner_band=0.5", "audit.shortcut.dataset_share=0.25")
PASSING = (
    "audit.shortcut.corner_band=0.05",
    "audit.shortcut.dataset_share=1.0",
    "audit.shortcut.fixed_lift=1e9",
    "audit.shortcut.outside_share=1.0",
)
QUICK = ("audit.methods=[cam]", "audit.faithfulness=false", "cam.scales=[1.0]", "cam.flip=false")


def run_stages(root: Path, stages: str, *overrides: str) -> None:
    run_pipeline(make_cfg(root, f"stages={stages}", *QUICK, *overrides))


@pytest.fixture(scope="module")
def flagged_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A run whose audit flags a shortcut, then stage 2 in warn mode; and the warnings."""
    root = tmp_path_factory.mktemp("shortcut")
    write_classifier(root / "runs/t/cls/checkpoints/best.ckpt")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("camseg.pseudo.audit_check")
    logger.addHandler(handler)
    try:
        run_stages(root, "[audit,pseudo]", *FLAGGING)
    finally:
        logger.removeHandler(handler)
    return root, [r.getMessage() for r in records if r.levelno >= logging.WARNING]


def test_a_flagged_audit_makes_stage_2_warn_once_and_record_it(
    flagged_run: tuple[Path, list[str]],
) -> None:
    root, warnings = flagged_run
    audit = json.loads((root / "runs/t/audit/audit.json").read_text())["methods"]["cam"]
    corner = audit["shortcut"]["corner"]
    assert audit["shortcut"]["flagged"] and corner is not None
    assert len(warnings) == 1 and "SHORTCUT WARNING" in warnings[0]
    assert f"the {corner} corner" in warnings[0] and "audit/audit.json" in warnings[0]
    manifest = json.loads((root / "runs/t/pseudo/manifest.json").read_text())
    recorded = manifest["audit_shortcut"]
    assert recorded["method"] == "cam" and f"corner:{corner}" in recorded["causes"]
    assert recorded["reasons"] == audit["shortcut"]["reasons"]
    report = (root / "runs/t/report.md").read_text()
    stage2 = report[report.index("## Stage 2: pseudo-masks") :]
    assert "the audit flagged a shortcut of the classifier these masks come from" in stage2
    assert f"the {corner} corner" in stage2


def test_error_mode_stops_stage_2_in_one_line_before_any_mask(
    flagged_run: tuple[Path, list[str]], tmp_path: Path
) -> None:
    root, _ = flagged_run
    manifest = root / "runs/t/pseudo/manifest.json"
    manifest.unlink()
    with pytest.raises(CamsegError) as e:
        run_stages(root, "[pseudo]", *FLAGGING, "pseudo.on_shortcut=error", "force=true")
    msg = str(e.value)
    assert "\n" not in msg and "pseudo.on_shortcut=error stops here" in msg and "corner" in msg
    assert not manifest.exists()


def test_an_unflagged_audit_or_ignore_mode_leaves_stage_2_quiet(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_classifier(tmp_path / "runs/t/cls/checkpoints/best.ckpt")
    with caplog.at_level(logging.INFO, logger="camseg.pseudo.audit_check"):
        run_stages(tmp_path, "[audit,pseudo]", *PASSING)
    assert not json.loads((tmp_path / "runs/t/audit/audit.json").read_text())["headline"][
        "shortcut"
    ]
    assert "SHORTCUT" not in caplog.text
    assert "audit_shortcut" not in json.loads(
        (tmp_path / "runs/t/pseudo/manifest.json").read_text()
    )
    assert "flagged a shortcut" not in (tmp_path / "runs/t/report.md").read_text()


# ---- the reader alone, on hand-written audit.json files ----


def write_audit(root: Path, sha: str, verdict: dict[str, Any], labels: str | None = None) -> RunDir:
    run = RunDir(root / "runs/t")
    out = run.root / "audit"
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "classifier": {"sha256": sha},
        "methods": {"cam": {"shortcut": verdict}, "gradcam": {"shortcut": {"flagged": False}}},
        "headline": {"method": "cam"},
    }
    (out / "audit.json").write_text(json.dumps(doc))
    if labels is not None:
        fp = fingerprint.Fingerprint("audit", {}, {fingerprint.LABELS: labels})
        (out / "fingerprint.json").write_text(json.dumps(fp.to_json()))
    return run


FLAG = {"flagged": True, "corner": None, "reasons": ["60% of the maps ..."]}
INPUTS = {fingerprint.CLS_CHECKPOINT: "abc", fingerprint.LABELS: "lab"}


def test_the_reader_takes_only_an_audit_of_the_same_checkpoint_and_dataset(tmp_path: Path) -> None:
    assert audit_shortcut(RunDir(tmp_path / "runs/t"), INPUTS, "cam") is None  # no audit
    run = write_audit(tmp_path, "abc", {**FLAG, "causes": ["outside_body"]}, labels="lab")
    found = audit_shortcut(run, INPUTS, "cam")
    assert found is not None and found["causes"] == ["outside_body"] and found["method"] == "cam"
    # Stage 2's method when the audit measured it: gradcam is not flagged.
    assert audit_shortcut(run, INPUTS, "gradcam") is None
    # A method the audit did not measure: the headline's verdict.
    assert audit_shortcut(run, INPUTS, "layercam") is not None
    other = {**INPUTS, fingerprint.CLS_CHECKPOINT: "def"}
    assert audit_shortcut(run, other, "cam") is None
    assert audit_shortcut(run, {**INPUTS, fingerprint.LABELS: "changed"}, "cam") is None


def test_the_causes_of_an_older_audit_json_are_derived_from_its_fields(tmp_path: Path) -> None:
    verdict = {
        **FLAG,
        "corner": "top-right",
        "outside_body_share": 0.3,
        "rule": {"dataset_share": 0.25},
    }
    found = audit_shortcut(write_audit(tmp_path, "abc", verdict), INPUTS, "cam")
    assert found is not None and found["causes"] == ["outside_body", "corner:top-right"]
    assert cause_words(found["causes"]) == "outside the body; the top-right corner"
    assert "fixed spot in the top-left" in cause_words(["fixed_location:top-left"])


def test_on_shortcut_modes(tmp_path: Path) -> None:
    write_classifier(tmp_path / "runs/t/cls/checkpoints/best.ckpt")
    run = RunDir(tmp_path / "runs/t")
    sha = sha256_file(run.cls_best)
    write_audit(tmp_path, sha, {**FLAG, "causes": ["corner:top-left"]})
    inputs = {fingerprint.CLS_CHECKPOINT: sha, fingerprint.LABELS: None}
    assert check_audit(make_cfg(tmp_path, "pseudo.on_shortcut=ignore"), run, inputs) is None
    assert check_audit(make_cfg(tmp_path), run, inputs) is not None  # warn by default
    with pytest.raises(CamsegError, match="the top-left corner"):
        check_audit(make_cfg(tmp_path, "pseudo.on_shortcut=error"), run, inputs)
    with pytest.raises(ConfigError, match=r"^pseudo.on_shortcut='loud': use one of \['warn'"):
        on_shortcut(make_cfg(tmp_path, "pseudo.on_shortcut=loud"))
