"""LGG MRI converter: Kaggle kaggle_3m tree -> the lgg-mri-40 layout."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from camseg.data.folder import validate_root
from camseg.data.prepare.lgg_mri import HEADER, convert_lgg_mri, patient_of
from camseg.errors import DatasetError
from camseg.utils.io import read_image, read_mask

LGG40 = Path("/work/shared/data/lgg-mri-40/labels.csv")
CASE_A = "TCGA_CS_4941_19960909"
CASE_B = "TCGA_DU_5849_20000101"
TUMOR_SLICES = {3, 10, 11}


def _image(case: str, n: int) -> np.ndarray:
    rng = np.random.default_rng([len(case), n])
    return rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)


def _mask(case: str, n: int) -> np.ndarray:
    m = np.zeros((16, 16), dtype=np.uint8)
    if case == CASE_A and n in TUMOR_SLICES:
        m[4 : 4 + n % 5 + 2, 5:9] = 255
    return m


def _kaggle(tmp_path: Path) -> Path:
    """``<tmp>/download/lgg-mri-segmentation/kaggle_3m`` with 12 slices of A (2 before 10) and 2 of B."""
    root = tmp_path / "download" / "lgg-mri-segmentation" / "kaggle_3m"
    for case, n_slices in ((CASE_A, 12), (CASE_B, 2)):
        d = root / case
        d.mkdir(parents=True)
        for n in range(1, n_slices + 1):
            tifffile.imwrite(d / f"{case}_{n}.tif", _image(case, n), photometric="rgb")
            tifffile.imwrite(d / f"{case}_{n}_mask.tif", _mask(case, n))
    (root / "data.csv").write_text("Patient,RNASeqCluster\n")
    (root / "README.md").write_text("kaggle readme\n")
    return tmp_path / "download"


def _rows(root: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(root / "labels.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_layout_matches_lgg_mri_40(tmp_path: Path) -> None:
    src = _kaggle(tmp_path)
    out = convert_lgg_mri(src, tmp_path / "out", progress=False)
    index = validate_root(out)
    header, rows = _rows(out)
    assert header == list(HEADER) == ["image", "mask", "group", "slice", "tumor"]
    if LGG40.is_file():  # the project's converted copy: compare the header only, never its data
        with open(LGG40, newline="") as f:
            assert next(csv.reader(f)) == header
    a_rows = [r for r in rows if r["group"] == "TCGA_CS_4941"]
    assert [int(r["slice"]) for r in a_rows] == list(range(1, 13))  # integer order: 2 before 10
    assert a_rows[1]["image"] == f"images/{CASE_A}_002.png"
    assert a_rows[9] == {
        "image": f"images/{CASE_A}_010.png",
        "mask": f"masks/{CASE_A}_010.png",
        "group": "TCGA_CS_4941",
        "slice": "10",
        "tumor": "1",
    }
    assert {int(r["slice"]) for r in a_rows if r["tumor"] == "1"} == TUMOR_SLICES
    assert [r["group"] for r in rows[12:]] == ["TCGA_DU_5849", "TCGA_DU_5849"]
    assert np.array_equal(read_image(out / f"images/{CASE_A}_011.png"), _image(CASE_A, 11))
    assert np.array_equal(
        read_mask(out / f"masks/{CASE_A}_011.png"), (_mask(CASE_A, 11) > 0).astype(np.uint8)
    )
    assert len(index) == 14 and index.classes == ["tumor"]


@pytest.mark.parametrize("where", ["download", "download/lgg-mri-segmentation/kaggle_3m"])
def test_src_may_point_at_kaggle_3m_or_above(tmp_path: Path, where: str) -> None:
    _kaggle(tmp_path)
    out = convert_lgg_mri(tmp_path / where, tmp_path / "out", patients=1, progress=False)
    _, rows = _rows(out)
    assert {r["group"] for r in rows} == {"TCGA_CS_4941"} and len(rows) == 12


def test_missing_mask_and_bad_source(tmp_path: Path) -> None:
    src = _kaggle(tmp_path)
    kaggle_3m = src / "lgg-mri-segmentation" / "kaggle_3m"
    mask = kaggle_3m / CASE_B / f"{CASE_B}_2_mask.tif"
    mask.unlink()
    with pytest.raises(
        DatasetError, match=rf"{CASE_B}_2.tif: no mask {CASE_B}_2_mask.tif beside it"
    ):
        convert_lgg_mri(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # staging removed
    tifffile.imwrite(mask, _mask(CASE_B, 2))
    with pytest.raises(DatasetError, match=r"no TCGA_\* case folders here, in kaggle_3m/"):
        convert_lgg_mri(kaggle_3m / CASE_B, tmp_path / "out", progress=False)
    shutil.rmtree(kaggle_3m / CASE_A)
    with pytest.raises(
        DatasetError, match="no converted sample shows class 'tumor'; convert more patients"
    ):
        convert_lgg_mri(src, tmp_path / "out", progress=False)


def test_patient_of() -> None:
    assert patient_of("TCGA_HT_A61A_20000127") == "TCGA_HT_A61A"
