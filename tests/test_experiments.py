"""The hemorrhage and nodule experiments run end to end, shrunk, on converted fixtures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from camseg.data.folder import validate_root
from camseg.data.prepare.ctich import convert_ct_ich
from camseg.data.prepare.lidc import LidcScanRecord, convert_lidc
from camseg.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[1]
SUBTYPES = ("Intraventricular", "Intraparenchymal", "Subarachnoid", "Epidural", "Subdural")

SHRINK = [
    "model.net.pretrained=false",
    "seg.net.encoder_weights=null",
    "model.net.backbone=resnet18",
    "seg.net.encoder_name=resnet18",
    "model.max_epochs=1",
    "seg.max_epochs=1",
    "data.image_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "cam.scales=[1.0]",
    "pseudo.overlays=1",
    "seg.overlays=1",
    "callbacks=minimal",
    "logger=csv",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
]


def ct_ich_release(root: Path, patients: int = 6, slices: int = 6, size: int = 32) -> Path:
    """A NIfTI CT-ICH release: head-like HU volumes, a hyperdense blob on some slices, its CSV."""
    (root / "ct_scans").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    head = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.42) ** 2
    rows = []
    for p in range(patients):
        ct = np.where(head[..., None], 35.0, -1000.0).repeat(slices, axis=2).astype(np.float32)
        ct += rng.normal(0, 3, ct.shape).astype(np.float32)
        mask = np.zeros(ct.shape, np.uint8)
        for z in range(slices):
            positive = (z + p) % 2 == 0
            if positive:
                cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
                blob = (yy - cy) ** 2 + (xx - cx) ** 2 < 16
                ct[..., z][blob] = 75.0
                mask[..., z][blob] = 1
            flags = [0] * 5
            if positive:
                flags[int(rng.integers(0, 5))] = 1
            rows.append([p + 1, z + 1, *flags, 0 if positive else 1, 0])
        affine = np.diag([-0.5, -0.5, 5.0, 1.0])
        nib.save(nib.Nifti1Image(ct, affine), root / "ct_scans" / f"{p + 1:03d}.nii")
        nib.save(nib.Nifti1Image(mask, affine), root / "masks" / f"{p + 1:03d}.nii")
    with open(root / "hemorrhage_diagnosis_raw_ct.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["PatientNumber", "SliceNumber", *SUBTYPES, "No_Hemorrhage", "Fracture_Yes_No"])
        w.writerows(rows)
    return root


def run_experiment(name: str, data_root: Path, tmp: Path, *extra: str) -> Path:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"experiment={name}",
                f"paths.root_dir={tmp}",
                f"data.root={data_root}",
                *SHRINK,
                *extra,
            ],
        )
    run_pipeline(cfg)
    return tmp / "runs" / name


def test_hemorrhage_experiment_on_a_converted_ct_ich_fixture(tmp_path: Path) -> None:
    src = ct_ich_release(tmp_path / "ct-ich-1.3.1")
    data = convert_ct_ich(src, tmp_path / "data" / "ct-ich", progress=False)
    index = validate_root(data)
    assert index.classes == ["hemorrhage"]
    # The recipe: 3 CT windows x 3 slices (2.5D), CRF, policy calibrated on the validation
    # patients' masks (CT-ICH has them), two self-training rounds.
    run = run_experiment("hemorrhage", data, tmp_path)
    manifest = json.loads((run / "pseudo/manifest.json").read_text())
    assert manifest["dataset"]["in_channels"] == 9 and manifest["dataset"]["context_slices"] == 1
    calibration = manifest["calibration"]
    assert calibration["status"] == "calibrated"
    assert calibration["configured"]["crf"]["bg_power"] == 1.0  # the recipe's fixed fallback
    applied = {k: v for k, v in manifest["policy"].items() if k != "ignore_index"}
    assert applied == calibration["chosen"]  # what was applied is what was chosen
    seg = json.loads((run / "seg/metrics.json").read_text())
    assert seg["round"] == 2 and [r["round"] for r in seg["rounds"]] == [1, 2]
    # Each round's validation score is recorded, and the best one is named.
    scores = [r["val/dice"] for r in seg["rounds"]]
    assert scores[0] == json.loads((run / "seg/round1/metrics.json").read_text())["val"]["val/dice"]
    assert seg["best_round_by_val"] == 1 + scores.index(max(scores))
    report = (run / "report.md").read_text()
    assert "| self-training round | val/dice | test/dice |" in report
    assert (run / "seg/round1/metrics.json").is_file()
    relabelled = list((run / "seg/round1/relabel/masks").glob("*.png"))
    assert len(relabelled) == len(manifest["samples"])
    assert "test/dice" in seg["test"]
    assert (run / "report.md").is_file()


def test_nodule_experiment_on_a_converted_lidc_fixture(tmp_path: Path) -> None:
    lidc = pytest.importorskip("test_prepare_lidc")  # its DICOM writer and reader outlines
    records = []
    for i in range(4):
        pid = f"LIDC-IDRI-000{i + 1}"
        folder = tmp_path / "LIDC-IDRI" / pid / "study" / "series"
        lidc.write_series(folder, lidc.phantom(), f"1.2.3.{i}")
        records.append(
            LidcScanRecord(
                pid, pid, folder, f"1.2.3.{i}", (lidc.READER_A, lidc.READER_B, lidc.READER_C)
            )
        )
    data = convert_lidc(
        tmp_path / "LIDC-IDRI",
        tmp_path / "data" / "lidc",
        source=lidc.FakeSource(records),
        progress=False,
    )
    assert validate_root(data).classes == ["nodule"]
    run = run_experiment(
        "nodule", data, tmp_path, "data.val_fraction=0.25", "data.test_fraction=0.25"
    )
    manifest = json.loads((run / "pseudo/manifest.json").read_text())
    assert manifest["cam"]["method"] == "layercam"
    assert json.loads((run / "seg/metrics.json").read_text())["stage"] == "seg"
