"""CT-ICH converter: windowing, orientation, both release layouts, the cross-check report."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from camseg.data.folder import validate_root
from camseg.data.prepare.ctich import SUBTYPES, convert_ct_ich, detect_layout
from camseg.data.prepare.windowing import CtWindow, apply_window, parse_windows
from camseg.errors import ConfigError, DatasetError
from camseg.utils.io import read_image, read_mask

CSV_HEADER = ["PatientNumber", "SliceNumber", *SUBTYPES, "No_Hemorrhage", "Fracture_Yes_No"]


def _row(
    patient: int, sl: int, subtypes: tuple[int, ...] = (0, 0, 0, 0, 0), none: int | None = None
) -> list[int]:
    no_hem = int(not any(subtypes)) if none is None else none
    return [patient, sl, *subtypes, no_hem, 0]


def _write_csv(path: Path, rows: list[list[int]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_HEADER)
        w.writerows(rows)


def _labels(root: Path) -> list[dict[str, str]]:
    with open(root / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def _report(root: Path) -> list[dict[str, str]]:
    with open(root / "conversion_report.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- windowing


def test_window_values_match_hand_computation() -> None:
    hu = np.array([-1000.0, 0.0, 20.0, 40.0, 80.0, 1000.0])
    # brain 40/80: [0, 80] -> 0..255; 20 HU -> 20/80*255 = 63.75 -> 64; 40 -> 127.5 -> 128 (half up)
    assert apply_window(hu, CtWindow("brain", 40, 80)).tolist() == [0, 0, 64, 128, 255, 255]
    # bone 600/2800: [-800, 2000]; 20 HU -> 820/2800*255 = 74.68 -> 75; 1000 -> 1800/2800*255 = 163.9 -> 164
    assert apply_window(hu, CtWindow("bone", 600, 2800)).tolist() == [0, 73, 75, 77, 80, 164]


def test_parse_windows_names_numbers_and_errors() -> None:
    wins = parse_windows("brain,subdural,bone")
    assert [(w.center, w.width) for w in wins] == [(40, 80), (80, 200), (600, 2800)]
    assert [(w.center, w.width) for w in parse_windows("-600/1500")] == [(-600, 1500)]
    with pytest.raises(ConfigError, match=r"give 1 \(grayscale\) or 3"):
        parse_windows("brain,bone")
    with pytest.raises(ConfigError, match="'wide' is not a window"):
        parse_windows("wide")
    with pytest.raises(ConfigError, match="width must be > 0"):
        parse_windows("40/0")


# ---------------------------------------------------------------- NIfTI layout


def _nifti_release(tmp_path: Path, affine: np.ndarray | None = None) -> tuple[Path, dict]:
    """Two patients. 049: 6x5x4 volume with a marker voxel and HU test values; 050: 6x5x3."""
    root = tmp_path / "ct-ich-1.3.1"
    (root / "ct_scans").mkdir(parents=True)
    (root / "masks").mkdir()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) if affine is None else affine
    ct = np.full((6, 5, 4), -1000.0, dtype=np.float32)
    mask = np.zeros((6, 5, 4), dtype=np.uint8)
    marker = (1, 0, 1)  # array (i, j, k): SliceNumber 2
    ct[marker] = 20.0
    mask[marker] = 1
    ct[4, 3, 1] = 1000.0
    mask[2, 2, 3] = 1  # slice 4: mask but labelled No_Hemorrhage
    nib.save(nib.Nifti1Image(ct, affine), root / "ct_scans" / "049.nii")
    nib.save(nib.Nifti1Image(mask, affine), root / "masks" / "049.nii")
    ct2 = np.full((6, 5, 3), 30.0, dtype=np.float32)
    mask2 = np.zeros((6, 5, 3), dtype=np.uint8)
    mask2[3, 3, 0] = 1
    nib.save(nib.Nifti1Image(ct2, affine), root / "ct_scans" / "050.nii.gz")
    nib.save(nib.Nifti1Image(mask2, affine), root / "masks" / "050.nii.gz")
    _write_csv(
        root / "hemorrhage_diagnosis_raw_ct.csv",
        [
            _row(49, 1),
            _row(49, 2, (0, 1, 0, 0, 0)),  # intraparenchymal, mask present: consistent
            _row(49, 3, (0, 0, 0, 0, 1)),  # subdural but empty mask -> label_without_mask
            _row(49, 4),  # mask non-empty but no hemorrhage -> mask_without_label
            _row(49, 5),  # the volume has 4 slices -> row_without_slice
            _row(50, 1, (1, 0, 1, 1, 1)),  # several subtypes
            _row(50, 2),
            # 050 slice 3 has no row -> slice_without_row
        ],
    )
    return root, {"marker": marker, "affine": affine}


def _expected_pixel(
    affine: np.ndarray, shape: tuple[int, int, int], voxel: tuple[int, int, int]
) -> tuple[int, int]:
    """Row/column of a voxel in radiological view, from world coordinates (independent of the code).

    Row 0 = most anterior (largest RAS y), column 0 = patient right (largest RAS x).
    """
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    world = affine @ np.stack(
        [ii.ravel(), jj.ravel(), np.full(ii.size, voxel[2]), np.ones(ii.size)]
    )
    x, y = (affine @ np.array([*voxel, 1.0]))[:2]
    xs, ys = np.unique(world[0]), np.unique(world[1])
    return int((ys > y).sum()), int((xs > x).sum())


@pytest.mark.parametrize("affine", [np.diag([-1.0, -1.0, 1.0, 1.0]), np.eye(4)], ids=["LPS", "RAS"])
def test_nifti_orientation_windows_and_labels(tmp_path: Path, affine: np.ndarray) -> None:
    src, info = _nifti_release(tmp_path, affine)
    out = convert_ct_ich(src, tmp_path / "out", progress=False)
    index = validate_root(out)
    assert index.classes == ["hemorrhage"]
    rows = {r["image"]: r for r in _labels(out)}
    assert sorted(rows) == [f"images/049_00{s}.png" for s in (1, 2, 3, 4)] + [
        f"images/050_00{s}.png" for s in (1, 2)
    ]
    r = rows["images/049_002.png"]
    assert (r["group"], r["slice"], r["hemorrhage"], r["mask"]) == (
        "049",
        "2",
        "1",
        "masks/049_002.png",
    )

    img = read_image(out / "images/049_002.png")
    assert img.shape == (5, 6, 3)  # (Y, X) after the transpose, RGB for three windows
    row, col = _expected_pixel(info["affine"], (6, 5, 4), info["marker"])
    # 20 HU: brain 63.75 -> 64, subdural (20+20)/200*255 = 51, bone 820/2800*255 = 74.68 -> 75
    assert img[row, col].tolist() == [64, 51, 75]
    background = np.ones(img.shape[:2], dtype=bool)
    background[row, col] = False
    background[_expected_pixel(info["affine"], (6, 5, 4), (4, 3, 1))] = False
    assert (img[background] == 0).all()  # -1000 HU is black in every window
    mask = read_mask(out / "masks/049_002.png")
    assert np.argwhere(mask).tolist() == [[row, col]]


def test_nifti_z_flipped_volume_keeps_csv_slice_numbers(tmp_path: Path) -> None:
    src, _ = _nifti_release(tmp_path, np.diag([1.0, 1.0, -1.0, 1.0]))
    out = convert_ct_ich(src, tmp_path / "out", windows="brain", progress=False)
    img = read_image(out / "images/049_002.png")
    assert img.ndim == 2  # one window -> grayscale
    # the 20 HU marker (brain window -> 64) is on array slice k=1 = SliceNumber 2, not on k=2
    assert (img == 64).sum() == 1
    assert not (read_image(out / "images/049_003.png") == 64).any()


def test_cross_check_report_and_strict(tmp_path: Path) -> None:
    src, _ = _nifti_release(tmp_path)
    out = convert_ct_ich(src, tmp_path / "out", progress=False)
    found = {(r["kind"], r["patient"], r["slice"]) for r in _report(out)}
    assert found == {
        ("label_without_mask", "049", "3"),
        ("mask_without_label", "049", "4"),
        ("row_without_slice", "049", "5"),
        ("slice_without_row", "050", "3"),
    }
    labels = {r["image"]: r["hemorrhage"] for r in _labels(out)}
    # inconsistent slices are kept as labelled, not dropped
    assert labels["images/049_003.png"] == "1" and labels["images/049_004.png"] == "0"

    strict_out = tmp_path / "strict"
    with pytest.raises(DatasetError, match=r"ct-ich: 4 inconsistencies .* drop --strict"):
        convert_ct_ich(src, strict_out, strict=True, progress=False)
    assert not strict_out.exists()
    assert (tmp_path / "strict.conversion_report.csv").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".strict")]  # no staging left


def test_subtypes_masks_only_where_unambiguous(tmp_path: Path) -> None:
    src, _ = _nifti_release(tmp_path)
    out = convert_ct_ich(src, tmp_path / "out", subtypes=True, progress=False)
    index = validate_root(out)
    assert index.classes == [s.lower() for s in SUBTYPES]
    rows = {r["image"]: r for r in _labels(out)}
    assert rows["images/049_002.png"]["intraparenchymal"] == "1"
    mask = read_mask(out / "masks/049_002.png")
    assert set(np.unique(mask).tolist()) == {0, SUBTYPES.index("Intraparenchymal") + 1}
    assert rows["images/050_001.png"]["mask"] == ""  # four subtypes: pixel classes unknown
    assert rows["images/049_001.png"]["mask"] == "masks/049_001.png"  # negative: all background
    assert rows["images/049_004.png"]["mask"] == ""  # no subtype but mask pixels: unknown class


def test_patients_subset_and_positive_check(tmp_path: Path) -> None:
    src, _ = _nifti_release(tmp_path)
    out = convert_ct_ich(src, tmp_path / "out", patients=1, progress=False)
    assert {r["group"] for r in _labels(out)} == {"049"}
    with pytest.raises(DatasetError, match="no converted sample shows class 'intraventricular'"):
        convert_ct_ich(src, tmp_path / "out2", patients=1, subtypes=True, progress=False)


def test_malformed_csv_value_names_line(tmp_path: Path) -> None:
    src, _ = _nifti_release(tmp_path)
    rows = [_row(49, 1), [49, 2, 0, 2, 0, 0, 0, 0, 0]]
    _write_csv(src / "hemorrhage_diagnosis_raw_ct.csv", rows)
    with pytest.raises(DatasetError, match=r"line 3: column 'Intraparenchymal' has value 2"):
        convert_ct_ich(src, tmp_path / "out", progress=False)


def test_layout_detection_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no ct_scans/ or Patients_CT/ folder"):
        detect_layout(tmp_path)
    (tmp_path / "release" / "ct_scans").mkdir(parents=True)
    assert detect_layout(tmp_path) == (tmp_path / "release", "nifti")


# ---------------------------------------------------------------- JPG layout


def _jpg_release(tmp_path: Path) -> Path:
    root = tmp_path / "jpg-release"
    brain = root / "Patients_CT" / "066" / "brain"
    brain.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for s in (1, 2, 10):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(
            brain / f"{s}.jpg", quality=95
        )
    seg = np.zeros((32, 32), dtype=np.uint8)
    seg[8:24, 16:32] = 255
    Image.fromarray(seg).save(brain / "2_HGE_Seg.jpg", quality=95)
    (root / "Patients_CT" / "066" / "bone").mkdir()
    _write_csv(
        root / "hemorrhage_diagnosis.csv",
        [_row(66, 1), _row(66, 2, (0, 0, 1, 0, 0)), _row(66, 10), _row(66, 11)],
    )
    return root


def test_jpg_layout(tmp_path: Path) -> None:
    src = _jpg_release(tmp_path)
    out = convert_ct_ich(src, tmp_path / "out", progress=False)
    validate_root(out)
    rows = {r["image"]: r for r in _labels(out)}
    assert sorted(rows) == ["images/066_001.png", "images/066_002.png", "images/066_010.png"]
    assert rows["images/066_002.png"]["hemorrhage"] == "1"
    expected = np.zeros((32, 32), dtype=np.uint8)
    expected[8:24, 16:32] = 1
    assert (read_mask(out / "masks/066_002.png") == expected).all()
    assert not read_mask(out / "masks/066_010.png").any()  # no _HGE_Seg file -> empty mask
    with Image.open(src / "Patients_CT/066/brain/10.jpg") as im:
        assert (read_image(out / "images/066_010.png") == np.asarray(im.convert("L"))).all()
    assert [(r["kind"], r["slice"]) for r in _report(out)] == [("row_without_slice", "11")]
    with pytest.raises(DatasetError, match="already brain-windowed"):
        convert_ct_ich(src, tmp_path / "out2", windows="bone", progress=False)
