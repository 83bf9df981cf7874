"""Folder-per-class converter: merged multi-file masks, negative class, groups, id clashes."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camseg.data.folder import validate_root
from camseg.data.prepare.folder_per_class import convert_folder, natural_key, safe_id
from camseg.errors import ConfigError, DatasetError
from camseg.utils.io import read_image, read_mask

H, W = 20, 24


def _save(path: Path, array: np.ndarray, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _block(r0: int, r1: int, c0: int, c1: int, value: int = 255) -> np.ndarray:
    m = np.zeros((H, W), dtype=np.uint8)
    m[r0:r1, c0:c1] = value
    return m


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """BUSI-like tree: benign (two mask files), malignant (JPEG mask; one image without mask), normal."""
    src = tmp_path / "busi"
    _save(src / "benign" / "P01_b1.png", _rgb(0))
    _save(src / "benign" / "P01_b1_mask.png", _block(0, 5, 0, 6))
    _save(src / "benign" / "P01_b1_mask_1.png", _block(10, 20, 12, 24, value=1))  # 0/1 file: > 0
    _save(src / "malignant" / "P02_m1.jpg", _rgb(1), quality=95)
    _save(src / "malignant" / "P02_m1_mask.jpg", _block(8, 16, 8, 16), quality=95)
    _save(src / "malignant" / "P03 m (2).png", _rgb(2))
    _save(src / "normal" / "P04_n1.png", _rgb(3)[..., 0])
    _save(src / "normal" / "P04_n1_mask.png", _block(1, 3, 1, 3))
    (src / "normal" / "notes.txt").write_text("not an image")
    return src


def _rows(root: Path) -> dict[str, dict[str, str]]:
    with open(root / "labels.csv", newline="") as f:
        return {r["image"]: r for r in csv.DictReader(f)}


def _report_kinds(root: Path) -> list[tuple[str, str]]:
    with open(root / "conversion_report.csv", newline="") as f:
        return sorted((r["kind"], r["patient"]) for r in csv.DictReader(f))


def test_convert_tree_with_masks_and_negative_class(tree: Path, tmp_path: Path) -> None:
    out = convert_folder(
        tree,
        tmp_path / "out",
        mask_suffix="_mask",
        negative_classes=["normal"],
        group_regex=r"^(P\d+)",
        progress=False,
    )
    index = validate_root(out)
    assert index.classes == ["benign", "malignant"]
    rows = _rows(out)
    assert sorted(rows) == [
        "images/P01_b1.png",
        "images/P02_m1.png",
        "images/P03_m_2.png",
        "images/P04_n1.png",
    ]
    b = rows["images/P01_b1.png"]
    assert (b["benign"], b["malignant"], b["group"]) == ("1", "0", "P01")
    assert rows["images/P03_m_2.png"]["group"] == "P03"
    # the two mask files merged by union, value 1 = benign's index among the positive classes
    assert np.array_equal(
        read_mask(out / b["mask"]), ((_block(0, 5, 0, 6) | _block(10, 20, 12, 24)) > 0) * 1
    )
    m = rows["images/P02_m1.png"]
    assert np.array_equal(read_mask(out / m["mask"]), (_block(8, 16, 8, 16) > 0) * 2)  # JPEG > 127
    n = rows["images/P04_n1.png"]
    assert (n["benign"], n["malignant"]) == ("0", "0") and not read_mask(out / n["mask"]).any()
    assert rows["images/P03_m_2.png"]["mask"] == ""
    assert np.array_equal(read_image(out / b["image"]), _rgb(0))  # pixels kept exactly
    assert read_image(out / n["image"]).ndim == 2  # grayscale stays grayscale
    assert _report_kinds(out) == [
        ("mask_on_negative", "P04_n1"),
        ("missing_mask", "P03_m_2"),
        ("not_an_image", "normal"),
    ]


def test_without_masks_every_file_is_an_image(tree: Path, tmp_path: Path) -> None:
    out = convert_folder(tree, tmp_path / "out", progress=False)
    index = validate_root(out)
    assert index.classes == ["benign", "malignant", "normal"]
    assert len(index) == 8 and not index.has_masks
    # without --group-regex the group is the image id
    assert {s.group for s in index.samples} == {s.id for s in index.samples}


def test_strict_and_errors(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="folder: 3 inconsistencies"):
        convert_folder(
            tree,
            tmp_path / "o",
            mask_suffix="_mask",
            negative_classes=["normal"],
            strict=True,
            progress=False,
        )
    with pytest.raises(DatasetError, match=r"--negative-class \['healthy'\] not found"):
        convert_folder(tree, tmp_path / "o", negative_classes=["healthy"], progress=False)
    with pytest.raises(DatasetError, match="does not match the file name 'P01_b1'"):
        convert_folder(tree, tmp_path / "o", group_regex=r"^X(\d+)", progress=False)
    with pytest.raises(ConfigError, match="--mask-suffix is empty"):
        convert_folder(tree, tmp_path / "o", mask_suffix="", progress=False)
    _save(tree / "normal" / "P01_b1.png", _rgb(5))
    with pytest.raises(
        DatasetError, match=r"image id 'P01_b1' is also the id of .*unique across class folders"
    ):
        convert_folder(tree, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_mask_size_mismatch_names_both_files(tree: Path, tmp_path: Path) -> None:
    _save(tree / "benign" / "P01_b1_mask_2.png", np.zeros((5, 5), dtype=np.uint8))
    with pytest.raises(
        DatasetError, match=r"P01_b1_mask_2.png: mask is 5x5 but its image P01_b1.png is 24x20"
    ):
        convert_folder(
            tree, tmp_path / "o", mask_suffix="_mask", negative_classes=["normal"], progress=False
        )


def test_helpers() -> None:
    assert safe_id("benign (10)") == "benign_10"
    assert sorted(["img10", "img2", "Img1"], key=natural_key) == ["Img1", "img2", "img10"]
