"""The audit stage and ``camseg-audit`` on a tiny synthetic dataset with an untrained classifier."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir

from camseg.audit_cli import main as audit_main
from camseg.errors import ConfigError
from camseg.models.classifier import CamClassifier
from camseg.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[1]
SMALL = (
    "debug=fast",
    "run_name=t",
    "data.synthetic.patients=4",
    "data.synthetic.slices_per_patient=4",
    "data.synthetic.size=32",
    "stages=[audit]",
    "audit.methods=[cam,gradcam]",
    "audit.steps=4",
    "audit.max_images=0",
)


def make_cfg(root: Path, *overrides: str) -> Any:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[*SMALL, f"paths.root_dir={root}", *overrides])


def write_classifier(path: Path) -> Path:
    """An untrained stage-1 checkpoint (resnet18, output stride 8: 4x4 maps at 32 pixels)."""
    cfg = {
        "_target_": "camseg.models.classifier.CamClassifier",
        "backbone": "resnet18",
        "source": "torchvision",
        "output_stride": 8,
        "pretrained": False,
        "dropout": 0.0,
        "num_classes": 1,
        "in_channels": 1,
    }
    torch.manual_seed(0)
    net = CamClassifier(**{k: v for k, v in cfg.items() if k != "_target_"})
    path.parent.mkdir(parents=True, exist_ok=True)
    hp = {"class_names": ["hemorrhage"], "multilabel": True, "net_config": cfg}
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "hyper_parameters": hp,
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("audit")
    write_classifier(root / "runs/t/cls/checkpoints/best.ckpt")
    run_pipeline(make_cfg(root))
    return root


def test_the_stage_writes_audit_json_with_every_section(audited: Path) -> None:
    out = audited / "runs/t/audit"
    doc = json.loads((out / "audit.json").read_text())
    assert set(doc["methods"]) == {"cam", "gradcam"}
    assert doc["headline"]["method"] == "cam"
    positives = sum(
        1
        for line in (Path(doc["dataset"]["root"]) / "labels.csv").read_text().splitlines()[1:]
        if line.endswith(",1")
    )
    assert doc["dataset"]["images"] == positives == len(doc["rows"])
    for m in doc["methods"].values():
        loc, f = m["localisation"], m["faithfulness"]
        assert 0 <= loc["energy_pointing"] <= 1 and 0 <= loc["pointing_game"] <= 1
        assert 0 <= m["anatomy"]["out_of_body_share"] <= 1
        assert 0 <= f["deletion_auc"] <= 1 and 0 <= f["insertion_auc"] <= 1
        assert isinstance(m["shortcut"]["flagged"], bool)
    row = doc["rows"][0]["methods"]["cam"]
    assert all(math.isfinite(row[k]) for k in ("deletion_auc", "insertion_auc", "out_of_body"))
    assert (out / "focus_cam.png").is_file() and (out / "focus_gradcam.png").is_file()
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["stage"] == "audit" and fp["config"]["audit.steps"] == 4
    assert "audit.batch_size" not in fp["config"] and "cls/checkpoints/best.ckpt" in fp["inputs"]


def test_the_report_carries_the_audit_headline(audited: Path) -> None:
    report = (audited / "runs/t/report.md").read_text()
    assert "| audit | done |" in report
    assert "## Audit: where the classifier looks" in report
    assert "| gradcam |" in report and "![outcome focus](audit/focus_cam.png)" in report


def test_a_rerun_reuses_the_audit_and_a_changed_setting_redoes_it(audited: Path) -> None:
    path = audited / "runs/t/audit/audit.json"
    os.utime(path, (1, 1))
    run_pipeline(make_cfg(audited))
    assert path.stat().st_mtime == 1  # fingerprint matches: reused
    run_pipeline(make_cfg(audited, "audit.tolerance=0.2"))
    assert path.stat().st_mtime > 1
    assert json.loads(path.read_text())["settings"]["tolerance"] == 0.2


def test_the_standalone_command_audits_any_checkpoint_and_dataset(
    audited: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    staged = json.loads((audited / "runs/t/audit/audit.json").read_text())
    ckpt = audited / "runs/t/cls/checkpoints/best.ckpt"
    data = staged["dataset"]["root"]
    with pytest.raises(SystemExit) as e:
        audit_main(
            [
                str(ckpt),
                data,
                "--out",
                str(tmp_path / "a"),
                "data.image_size=32",
                "data.num_workers=0",
                "cam=cam",
                "cam.scales=[1.0,0.5]",
                "audit.steps=4",
                "audit.tolerance=0.2",
                "trainer.accelerator=cpu",
            ]
        )
    assert e.value.code == 0
    doc = json.loads((tmp_path / "a/audit.json").read_text())
    assert "energy inside the lesion" in capsys.readouterr().out

    # The same maps as the stage's (tolerance aside, which energy pointing does not use).
    def by_id(d: dict[str, Any]) -> dict[str, float]:
        return {r["id"]: r["methods"]["cam"]["energy_pointing"] for r in d["rows"]}

    assert by_id(doc) == pytest.approx(by_id(staged), abs=1e-5)


def test_the_standalone_command_refuses_bad_input_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        audit_main([str(tmp_path / "none.ckpt"), str(tmp_path), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "none.ckpt: checkpoint not found" in err


@pytest.mark.parametrize(
    "override,message",
    [("audit.split=holdout", "audit.split='holdout'"), ("audit.baseline=noise", "audit.baseline")],
)
def test_bad_audit_settings_are_refused_in_one_line(
    audited: Path, override: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        run_pipeline(make_cfg(audited, override, "force=true"))
