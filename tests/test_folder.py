"""The dataset folder format: loading, validation errors, summary and ``camseg-data check``."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

from camseg.constants import RESERVED_COLUMNS
from camseg.data.folder import load_index, sample_id, summarize, validate_root
from camseg.errors import DatasetError

if TYPE_CHECKING:
    from conftest import DatasetKit


def _two_class_root(tmp_path: Path, kit: DatasetKit) -> Path:
    """Two classes, explicit splits, two image sizes, one sample without a mask, an extra column."""
    rng = np.random.default_rng(1)
    records = []
    labels = [(1, 0), (0, 1), (1, 1), (0, 0), (0, 0), (1, 0), (0, 1), (0, 0)]
    for i, (a, b) in enumerate(labels):
        size = 32 if i % 3 else 40
        image = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        mask[2:6, 2:6] = 1 if a else 0
        mask[10:14, 10:14] = 2 if b else 0
        records.append(
            kit.Record(
                f"s{i}",
                image,
                {"alpha": a, "beta": b},
                None if i == 4 else mask,
                group=f"g{i // 2}",
                split=("train", "val", "test", "train")[i // 2],
                slice=i % 2,
                extra={"site": f"h{i % 2}"},
            )
        )
    root = kit.write(tmp_path / "two", records, ["alpha", "beta"])
    # Put the extra column between the class columns: classes keep CSV order, reserved ones drop out.
    rows = kit.read_rows(root)
    kit.write_rows(
        root, rows, ["image", "alpha", "site", "mask", "group", "beta", "split", "slice"]
    )
    return root


def test_valid_root_loads_classes_labels_and_summary(tmp_path: Path, kit: DatasetKit) -> None:
    root = _two_class_root(tmp_path, kit)
    rows = kit.read_rows(root)
    index = validate_root(root, classes=["alpha", "beta"])
    assert index.classes == ["alpha", "beta"]
    assert index.extra_columns == ["site"]
    expected = np.array([[int(r["alpha"]), int(r["beta"])] for r in rows], dtype=np.uint8)
    np.testing.assert_array_equal(index.labels_array(), expected)
    assert [s.image for s in index.samples] == [r["image"] for r in rows]
    assert [s.split for s in index.samples] == [r["split"] for r in rows]
    assert [s.slice for s in index.samples] == [int(r["slice"]) for r in rows]
    assert [s.mask for s in index.samples] == [r["mask"] or None for r in rows]
    assert index.has_masks

    summary = summarize(index)
    assert summary["samples"] == len(rows)
    assert summary["positives"] == {c: sum(r[c] == "1" for r in rows) for c in ("alpha", "beta")}
    assert summary["negatives"] == sum(r["alpha"] == r["beta"] == "0" for r in rows)
    assert summary["groups"] == len({r["group"] for r in rows})
    assert summary["masks"] == sum(bool(r["mask"]) for r in rows)
    assert summary["splits"] == dict(Counter(r["split"] for r in rows))
    sizes = Counter()
    for r in rows:
        with Image.open(root / r["image"]) as im:
            sizes[f"{im.width}x{im.height}"] += 1
    assert summary["image_sizes"] == dict(sizes)


def test_default_classes_are_all_non_reserved_columns(tiny_dataset: Path, kit: DatasetKit) -> None:
    rows = kit.read_rows(tiny_dataset)
    index = load_index(tiny_dataset)
    assert set(RESERVED_COLUMNS) <= set(rows[0])
    assert index.classes == ["lesion"]
    assert len(index) == len(rows)
    assert [s.group for s in index.samples] == [r["group"] for r in rows]
    assert index.labels_array()[:, 0].tolist() == [int(r["lesion"]) for r in rows]
    assert summarize(index, with_sizes=False)["negatives"] == sum(r["lesion"] == "0" for r in rows)


def test_group_defaults_to_sample_id_and_paths_are_normalised(
    tmp_path: Path, kit: DatasetKit
) -> None:
    records = [kit.Record(f"a{i}", np.zeros((8, 8), np.uint8), {"x": i % 2}) for i in range(3)]
    root = kit.write(tmp_path / "r", records, ["x"], columns=("image",))
    rows = kit.read_rows(root)
    rows[0]["image"] = "./" + rows[0]["image"]
    kit.write_rows(root, rows)
    index = load_index(root)
    assert index.samples[0].image == "images/a0.png"
    assert [s.group for s in index.samples] == [sample_id(f"images/a{i}.png") for i in range(3)]
    assert index.samples[0].id == "a0"
    assert not index.has_masks


def test_spreadsheet_leftovers_are_tolerated(tmp_path: Path, kit: DatasetKit) -> None:
    """Trailing empty unnamed columns and blank lines, as spreadsheet exports write them."""
    root = kit.write(tmp_path / "r", kit.tiny_records(patients=2, slices=2), ["lesion"])
    text = (root / "labels.csv").read_text().splitlines()
    (root / "labels.csv").write_text("\n".join([t + "," for t in text] + [",,,,,,", ""]) + "\n")
    assert len(load_index(root)) == 4


# --- refusals: each names the file, the row or column, and the fix -----------------------------


def _break_cell(root: Path, kit: DatasetKit, row: int, column: str, value: str) -> None:
    rows = kit.read_rows(root)
    rows[row - 1][column] = value
    kit.write_rows(root, rows)


def _png_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("row", "column", "value", "pattern"),
    [
        (
            3,
            "lesion",
            "2",
            r"labels\.csv: row 3 \(line 4\): column 'lesion' has value 2; class columns must be 0 or 1",
        ),
        (5, "lesion", "", r"row 5 .*column 'lesion' has value empty; class columns must be 0 or 1"),
        (2, "lesion", "yes", r"row 2 .*column 'lesion' has value yes"),
        (
            2,
            "image",
            "../x.png",
            r"row 2 .*column 'image' path '\.\./x\.png' escapes the dataset root",
        ),
        (2, "image", "images/../../x.png", r"row 2 .*escapes the dataset root; remove '\.\.'"),
        (
            4,
            "image",
            "/etc/x.png",
            r"row 4 .*column 'image' is the absolute path '/etc/x\.png'; paths must be relative",
        ),
        (4, "mask", "/etc/x.png", r"row 4 .*column 'mask' is the absolute path"),
        (1, "image", "", r"row 1 .*column 'image' is empty"),
        (3, "split", "training", r"row 3 .*column 'split' has value 'training'; use one of"),
        (
            3,
            "slice",
            "two",
            r"row 3 .*column 'slice' has value 'two'; slice indices must be integers",
        ),
        (
            2,
            "image",
            "images/P00_00.png",
            r"row 2 .*image 'images/P00_00\.png' is listed again \(first in row 1\)",
        ),
    ],
)
def test_bad_cells_are_refused_with_row_and_column(
    tiny_dataset: Path, kit: DatasetKit, row: int, column: str, value: str, pattern: str
) -> None:
    _break_cell(tiny_dataset, kit, row, column, value)
    with pytest.raises(DatasetError, match=pattern):
        load_index(tiny_dataset)


def test_missing_files_are_refused(tiny_dataset: Path, kit: DatasetKit) -> None:
    rows = kit.read_rows(tiny_dataset)
    (tiny_dataset / rows[2]["mask"]).unlink()
    with pytest.raises(
        DatasetError,
        match=r"row 3 .*mask file 'masks/P00_02\.png' not found under .*clear the 'mask' cell",
    ):
        load_index(tiny_dataset)
    # Without file checks the same root loads (structure only).
    assert len(load_index(tiny_dataset, check_files=False)) == len(rows)
    (tiny_dataset / rows[1]["image"]).unlink()
    with pytest.raises(
        DatasetError,
        match=r"row 2 .*image file 'images/P00_01\.png' not found under .*add the file",
    ):
        validate_root(tiny_dataset)


def test_structural_problems_are_refused(
    tmp_path: Path, tiny_dataset: Path, kit: DatasetKit
) -> None:
    with pytest.raises(DatasetError, match=r"dataset root does not exist"):
        load_index(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        DatasetError, match=r"labels\.csv: not found; a dataset root needs a labels\.csv"
    ):
        load_index(empty)

    rows = kit.read_rows(tiny_dataset)
    for r in rows:
        r["path"] = r.pop("image")
    kit.write_rows(tiny_dataset, rows)
    with pytest.raises(
        DatasetError, match=r"labels\.csv: no 'image' column \(header is .*'path'.*\); add one"
    ):
        load_index(tiny_dataset)

    for r in rows:
        r["image"] = r.pop("path")
        r["lesion"] = "0"
    kit.write_rows(tiny_dataset, rows)
    with pytest.raises(
        DatasetError, match=r"class 'lesion' has no positive row; drop the column or add images"
    ):
        load_index(tiny_dataset)
    assert load_index(tiny_dataset, require_positive=False).labels_array().sum() == 0

    kit.write_rows(tiny_dataset, rows, ["image", "group"])
    with pytest.raises(DatasetError, match=r"no class column; add one 0/1 column per class"):
        load_index(tiny_dataset)
    with pytest.raises(DatasetError, match=r"class column\(s\) \['tumour'\] not found"):
        load_index(tiny_dataset, classes=["tumour"])

    kit.write_rows(tiny_dataset, [], ["image", "lesion"])
    with pytest.raises(DatasetError, match=r"no rows; list one image per row"):
        load_index(tiny_dataset)


def test_malformed_csv_rows_are_refused(tiny_dataset: Path) -> None:
    csv_path = tiny_dataset / "labels.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([*lines[:3], lines[3] + ",surplus", *lines[4:]]) + "\n")
    with pytest.raises(DatasetError, match=r"line 4 has 7 cells but the header has 6 columns"):
        load_index(tiny_dataset)
    csv_path.write_text(
        "\n".join([lines[0] + ",", *lines[1:3], lines[3] + ",7", *lines[4:]]) + "\n"
    )
    with pytest.raises(
        DatasetError, match=r"line 4 has the value '7' in column 7, which has no name"
    ):
        load_index(tiny_dataset)
    header = lines[0].split(",")
    csv_path.write_text(
        "\n".join([",".join([*header, header[-1]]), *(ln + ",0" for ln in lines[1:])]) + "\n"
    )
    with pytest.raises(DatasetError, match=r"duplicate column\(s\) \['lesion'\]"):
        load_index(tiny_dataset)


def test_group_in_two_splits_is_refused(tiny_dataset: Path, kit: DatasetKit) -> None:
    rows = kit.read_rows(tiny_dataset)
    for r in rows:
        r["split"] = "train"
    rows[-1]["split"] = "test"
    kit.write_rows(tiny_dataset, rows)
    group = rows[-1]["group"]
    with pytest.raises(
        DatasetError, match=rf"group '{group}' is in both 'train' and 'test' splits"
    ):
        load_index(tiny_dataset)


def test_unreadable_and_truncated_images_are_refused(tiny_dataset: Path, kit: DatasetKit) -> None:
    rows = kit.read_rows(tiny_dataset)
    path = tiny_dataset / rows[3]["image"]
    path.write_bytes(b"not an image at all")
    assert len(load_index(tiny_dataset)) == len(rows)  # load_index checks presence only
    with pytest.raises(
        DatasetError, match=r"P00_03\.png \(labels\.csv row 4\): cannot read image .*re-export"
    ):
        validate_root(tiny_dataset)

    data = _png_bytes(np.random.default_rng(0).integers(0, 255, (48, 48), dtype=np.uint8))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        DatasetError, match=r"P00_03\.png \(labels\.csv row 4\): cannot read image \(.*truncated"
    ):
        validate_root(tiny_dataset)


def test_bad_masks_are_refused(tiny_dataset: Path, kit: DatasetKit) -> None:
    rows = kit.read_rows(tiny_dataset)
    mask_path = tiny_dataset / rows[5]["mask"]
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(mask_path)
    with pytest.raises(
        DatasetError,
        match=r"P01_01\.png \(labels\.csv row 6\): mask is 48x40 but image 'images/P01_01\.png' is 48x48",
    ):
        validate_root(tiny_dataset)

    bad = np.zeros((48, 48), np.uint8)
    bad[0, 0], bad[5, 5] = 2, 7
    Image.fromarray(bad).save(mask_path)
    with pytest.raises(
        DatasetError,
        match=r"row 6\): mask has value\(s\) \[2, 7\]; allowed are 0 \(background\) to 1",
    ):
        validate_root(tiny_dataset)

    bad[:] = 0
    bad[1, 1] = 255  # 255 = ignore: pixels nobody could label are left out of the metrics
    Image.fromarray(bad).save(mask_path)
    validate_root(tiny_dataset)
    bad[1, 1] = 254
    Image.fromarray(bad).save(mask_path)
    with pytest.raises(DatasetError, match=r"mask has value\(s\) \[254\]"):
        validate_root(tiny_dataset)

    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(mask_path)
    with pytest.raises(DatasetError, match=r"row 6\): cannot read mask .*single-channel"):
        validate_root(tiny_dataset)


def test_synthetic_dataset_validates(tmp_path: Path) -> None:
    synthetic = pytest.importorskip("camseg.data.synthetic")
    root = synthetic.generate(tmp_path / "syn", patients=3, slices_per_patient=3, size=32, seed=0)
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    index = validate_root(root)
    assert len(index) == len(rows) == 9
    assert summarize(index)["groups"] == 3


# --- camseg-data check -------------------------------------------------------------------------


def test_cli_check_prints_summary(
    tiny_dataset: Path, kit: DatasetKit, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = pytest.importorskip("camseg.data.cli")
    rows = kit.read_rows(tiny_dataset)
    assert cli.main(["check", str(tiny_dataset)]) == 0
    out = capsys.readouterr().out
    assert str(tiny_dataset) in out
    assert "lesion" in out
    assert str(len(rows)) in out
    assert "48x48" in out


def test_cli_check_bad_root_is_one_line(
    tiny_dataset: Path, kit: DatasetKit, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = pytest.importorskip("camseg.data.cli")
    _break_cell(tiny_dataset, kit, 3, "lesion", "2")
    assert cli.main(["check", str(tiny_dataset)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert (
        "row 3" in lines[0]
        and "'lesion'" in lines[0]
        and "class columns must be 0 or 1" in lines[0]
    )
