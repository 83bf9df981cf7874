"""``camseg-data check`` previews the patient split the pipeline would make, and warns when a
split cannot have positives of a class."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from camseg.data.cli import main
from camseg.data.datamodule import CamSegDataModule


def _check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[str, str]:
    assert main(["check", *args]) == 0
    out = capsys.readouterr()
    return out.out, out.err


def test_preview_is_the_split_the_datamodule_makes(
    kit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = kit.write(tmp_path / "d", kit.tiny_records(patients=10, slices=2), ["lesion"])
    out, err = _check(
        capsys, str(root), "--quick", "--json", "--val-fraction", "0.2", "--split-seed", "3"
    )
    preview = json.loads(out)["split_preview"]
    dm = CamSegDataModule(root=str(root), image_size=32, val_fraction=0.2, split_seed=3)
    dm.setup()
    for name in ("train", "val", "test"):
        samples = dm.splits[name]
        assert preview["splits"][name]["patients"] == len({s.group for s in samples})
        assert preview["splits"][name]["images"] == len(samples)
        assert preview["splits"][name]["positives"]["lesion"] == sum(s.labels[0] for s in samples)
    assert preview["warnings"] == [] and err == ""


def test_a_split_without_positives_is_warned(
    kit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = kit.tiny_records(patients=8, slices=2)
    # Only two patients have a lesion: with 8 patients and 15 % each, val and test get one
    # patient each and cannot both hold a positive one.
    for r in records:
        if r.group not in ("P00", "P01"):
            r.labels["lesion"] = 0
            r.mask[...] = 0
    root = kit.write(tmp_path / "d", records, ["lesion"])
    out, err = _check(capsys, str(root), "--quick")
    assert "patient split the pipeline would make" in out
    assert "camseg-data: warning: the" in err and "has no positive 'lesion' image" in err
