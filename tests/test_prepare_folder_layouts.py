"""``camseg-data folder`` on class folders with images/ + masks/ subfolders; progress in logs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camseg.data.folder import validate_root
from camseg.data.prepare.folder_per_class import convert_folder
from camseg.data.progress import progress
from camseg.errors import DatasetError
from camseg.utils.io import read_image, read_mask

REPO = Path(__file__).resolve().parents[1]
H, W = 12, 16


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _mask(r0: int, r1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=np.uint8)
    m[r0:r1, 2:10] = 255
    return m


@pytest.fixture
def split_tree(tmp_path: Path) -> Path:
    """A breast-ultrasound-like download: <class>/images/ and <class>/mask(s)/, mixed names."""
    src = tmp_path / "busi"
    _save(src / "benign" / "images" / "benign (1).png", _image(0))
    _save(src / "benign" / "masks" / "benign (1)_mask.png", _mask(0, 4))
    _save(src / "benign" / "masks" / "benign (1)_mask_1.png", _mask(8, 12))  # second lesion
    _save(src / "benign" / "images" / "benign (2).png", _image(1))
    _save(src / "benign" / "masks" / "benign (2).png", _mask(2, 6))  # same stem, no suffix
    _save(src / "malignant" / "Images" / "m1.png", _image(2))
    _save(src / "malignant" / "mask" / "m1-MASK.png", _mask(4, 8))  # other case, '-mask'
    _save(src / "normal" / "images" / "n1.png", _image(4))
    _save(src / "normal" / "masks" / "n1_seg.png", np.zeros((H, W), dtype=np.uint8))
    return src


def _rows(root: Path) -> dict[str, dict[str, str]]:
    with open(root / "labels.csv", newline="") as f:
        return {r["image"]: r for r in csv.DictReader(f)}


def test_images_and_masks_subfolders_convert(split_tree: Path, tmp_path: Path) -> None:
    out = convert_folder(split_tree, tmp_path / "out", negative_classes=["normal"], progress=False)
    index = validate_root(out)
    assert index.classes == ["benign", "malignant"] and index.has_masks
    rows = _rows(out)
    assert sorted(rows) == [
        "images/benign_1.png",
        "images/benign_2.png",
        "images/m1.png",
        "images/n1.png",
    ]
    b1, b2, m1 = rows["images/benign_1.png"], rows["images/benign_2.png"], rows["images/m1.png"]
    assert (b1["benign"], b1["malignant"], m1["benign"], m1["malignant"]) == ("1", "0", "0", "1")
    # both mask files of benign (1) merged; value 1 = benign, 2 = malignant
    assert np.array_equal(read_mask(out / b1["mask"]), ((_mask(0, 4) | _mask(8, 12)) > 0) * 1)
    assert np.array_equal(read_mask(out / b2["mask"]), (_mask(2, 6) > 0) * 1)
    assert np.array_equal(read_mask(out / m1["mask"]), (_mask(4, 8) > 0) * 2)
    assert not read_mask(out / rows["images/n1.png"]["mask"]).any()
    assert np.array_equal(read_image(out / m1["image"]), _image(2))
    assert not (out / "conversion_report.csv").exists()


def test_an_unmatched_mask_is_reported_and_strict_refuses_it(
    split_tree: Path, tmp_path: Path
) -> None:
    _save(split_tree / "benign" / "masks" / "benign (3)_mask.png", _mask(0, 2))
    (split_tree / "benign" / "readme.txt").write_text("from kaggle")
    out = convert_folder(split_tree, tmp_path / "out", negative_classes=["normal"], progress=False)
    with open(out / "conversion_report.csv", newline="") as f:
        report = {r["kind"]: r for r in csv.DictReader(f)}
    assert sorted(report) == ["mask_without_image", "not_read"]
    assert report["mask_without_image"]["file"] == "benign/masks/benign (3)_mask.png"
    assert (
        "no image named 'benign (3)' in the images folder"
        in (report["mask_without_image"]["detail"])
    )
    assert len(_rows(out)) == 4
    with pytest.raises(DatasetError, match=r"folder: 2 inconsistencies .*mask_without_image"):
        convert_folder(
            split_tree, tmp_path / "o2", negative_classes=["normal"], strict=True, progress=False
        )


def test_masks_named_in_an_unknown_scheme_are_refused(split_tree: Path, tmp_path: Path) -> None:
    for p in (split_tree / "malignant" / "mask").iterdir():
        p.rename(p.with_name("annotation_m1.png"))
    with pytest.raises(
        DatasetError, match=r"none of its 1 masks matches an image .* pass --mask-suffix"
    ):
        convert_folder(split_tree, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_custom_suffix_is_recognised_in_masks_folders(split_tree: Path, tmp_path: Path) -> None:
    for p in (split_tree / "malignant" / "mask").iterdir():
        p.rename(p.with_name("m1.roi.png"))
    out = convert_folder(split_tree, tmp_path / "out", mask_suffix=".roi", progress=False)
    assert read_mask(out / _rows(out)["images/m1.png"]["mask"]).max() == 2


def test_an_unrecognised_layout_lists_the_layouts_understood(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _save(src / "benign" / "scans" / "a.png", _image(0))  # one level too deep, not images/
    with pytest.raises(DatasetError) as e:
        convert_folder(src, tmp_path / "out", progress=False)
    message = str(e.value)
    assert "no image files in the class folders; understood layouts:" in message
    assert "SRC/<class>/images/<image> + SRC/<class>/masks/<mask>" in message
    assert "\n" not in message
    # SRC pointed one level too low, at a class folder: not two classes 'images' and 'masks'
    _save(tmp_path / "benign" / "images" / "a.png", _image(0))
    _save(tmp_path / "benign" / "masks" / "a_mask.png", _mask(0, 2))
    with pytest.raises(DatasetError, match=r"holds images/ and masks/ folders, the inside of one"):
        convert_folder(tmp_path / "benign", tmp_path / "out", progress=False)


def test_off_a_terminal_progress_writes_plain_lines(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(progress(range(5), desc="job", unit="image", interval_s=0.0)) == list(range(5))
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines() == [f"job: {n}/5 images, 0s" for n in range(1, 6)]
    assert list(progress(range(5), desc="job", unit="image")) == list(range(5))  # 60 s interval
    assert list(progress(iter(range(3)), desc="job", unit="x", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_a_conversion_logged_to_a_file_stays_a_few_lines(split_tree: Path, tmp_path: Path) -> None:
    """What a log file sees (stdout and stderr not a terminal): no bar, one summary line."""
    path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-m", "camseg.data.cli", "folder", str(split_tree), "--out",
         str(tmp_path / "out"), "--negative-class", "normal"],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    )  # fmt: skip
    log = done.stdout + done.stderr
    assert "\r" not in log
    assert log.splitlines() == [
        f"folder: wrote 4 samples to {tmp_path / 'out'}; no inconsistencies found"
    ]
