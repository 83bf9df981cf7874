"""End to end: a classifier trained on marked synthetic data is flagged, a clean one is not.

Small but real: 16 patients x 8 slices of 64 pixels, 3 epochs of resnet18 at output
stride 8, the audit with stage 2's CAMs. About 2-10 minutes on a 2-core CPU: slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from camseg.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[1]


def audit_of(root: Path, marker_prob: float) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "debug=fast",
                f"paths.root_dir={root}",
                "run_name=t",
                "stages=[cls,audit]",
                f"data.synthetic.shortcut_marker_prob={marker_prob}",
                "data.synthetic.size=64",
                "data.synthetic.patients=16",
                "data.synthetic.slices_per_patient=8",
                "model.max_epochs=3",
                "model.net.output_stride=8",
                "audit.faithfulness=false",
            ],
        )
    run_pipeline(cfg)
    return json.loads((root / "runs/t/audit/audit.json").read_text())


@pytest.mark.slow
def test_the_audit_flags_a_planted_marker_names_its_corner_and_passes_clean_data(
    tmp_path: Path,
) -> None:
    marked = audit_of(tmp_path / "marked", 0.9)["methods"]["cam"]["shortcut"]
    assert marked["flagged"] and marked["corner"] == "top-left"
    clean = audit_of(tmp_path / "clean", 0.0)["methods"]["cam"]["shortcut"]
    assert not clean["flagged"] and clean["corner"] is None
    assert marked["corner_share"]["top-left"] > 2 * clean["corner_share"]["top-left"] + 0.25
