"""The synthetic dataset generator: format, determinism, label/mask agreement, lesion contrast."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import camseg.data.synthetic as synthetic
from camseg.data.folder import validate_root
from camseg.data.synthetic import FLAVORS, generate, marker_box, min_lesion_area
from camseg.errors import ConfigError, DatasetError

TINY = {"patients": 4, "slices_per_patient": 4, "size": 64}


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _load(root: Path, row: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(Image.open(root / row["image"])), np.asarray(Image.open(root / row["mask"]))


@pytest.mark.parametrize("flavor", FLAVORS)
def test_same_seed_gives_identical_bytes_and_other_seed_differs(
    tmp_path: Path, flavor: str
) -> None:
    a = _files(generate(tmp_path / "a", flavor=flavor, seed=3, **TINY))
    b = _files(generate(tmp_path / "b", flavor=flavor, seed=3, **TINY))
    c = _files(generate(tmp_path / "c", flavor=flavor, seed=4, **TINY))
    assert a.keys() == b.keys() == c.keys()
    assert {"labels.csv", "README.md"} <= a.keys()
    assert len([k for k in a if k.endswith(".png")]) == 2 * 4 * 4
    assert a == b
    differing = [k for k in a if k.startswith("images/") and a[k] != c[k]]
    assert len(differing) == 16  # every image changes with the seed


def test_a_patient_does_not_depend_on_the_number_of_patients(tmp_path: Path) -> None:
    few = _files(generate(tmp_path / "few", patients=3, slices_per_patient=4, size=48))
    many = _files(generate(tmp_path / "many", patients=5, slices_per_patient=4, size=48))
    shared = [k for k in few if k.endswith(".png")]
    assert shared and all(few[k] == many[k] for k in shared)
    assert len([k for k in many if k.endswith(".png")]) == 2 * 5 * 4


@pytest.mark.parametrize("flavor", FLAVORS)
def test_format_labels_and_masks_agree(tmp_path: Path, flavor: str) -> None:
    root = generate(tmp_path / "ds", flavor=flavor, patients=5, slices_per_patient=6, size=64)
    index = validate_root(root)
    assert index.classes == [flavor]
    with open(root / "labels.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == ["image", "mask", "group", "slice", flavor]
    rows = _rows(root)
    assert [(r["group"], int(r["slice"])) for r in rows] == [
        (f"P{p:03d}", z) for p in range(5) for z in range(6)
    ]
    for row in rows:
        with Image.open(root / row["image"]) as im:
            assert (im.mode, im.size) == ("L", (64, 64))
        with Image.open(root / row["mask"]) as mk:
            assert (mk.mode, mk.size) == ("L", (64, 64))
        _, mask = _load(root, row)
        assert set(np.unique(mask).tolist()) <= {0, 1}
        area = int(mask.sum())
        if row[flavor] == "1":
            assert area >= min_lesion_area(64) >= 20, row
        else:
            assert row[flavor] == "0" and area == 0, row


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_positive_fraction_follows_lesion_prob(tmp_path: Path, p: float) -> None:
    root = generate(
        tmp_path / "ds", flavor="nodule", patients=40, slices_per_patient=8, size=32, lesion_prob=p
    )
    labels = np.array([int(r["nodule"]) for r in _rows(root)])
    assert labels.size == 320
    assert abs(labels.mean() - p) < 0.12


@pytest.mark.parametrize("flavor", FLAVORS)
def test_lesions_are_brighter_than_the_tissue_around_them(tmp_path: Path, flavor: str) -> None:
    root = generate(tmp_path / "ds", flavor=flavor, patients=12, slices_per_patient=8, size=96)
    diffs = []
    for row in _rows(root):
        if row[flavor] == "0":
            continue
        image, mask = _load(root, row)
        lesion = mask.astype(bool)
        # The ring of 3 px around the lesion, without bone (the skull that subdural
        # crescents lie against, ribs): lesions are hyperdense to soft tissue, not to bone.
        ring = ndimage.binary_dilation(lesion, iterations=3) & ~lesion & (image < 205)
        diffs.append(image[lesion].mean() - image[ring].mean())
    diffs_a = np.array(diffs)
    assert diffs_a.size >= 20
    assert np.median(diffs_a) > 20
    assert (diffs_a > 0).mean() >= 0.85


def test_neighbouring_slices_are_coherent(tmp_path: Path) -> None:
    root = generate(tmp_path / "ds", patients=3, slices_per_patient=6, size=64)
    rows = _rows(root)
    vol = np.stack([_load(root, r)[0].astype(np.float32) for r in rows]).reshape(3, 6, 64, 64)
    within = np.abs(np.diff(vol, axis=1)).mean()
    across = np.abs(vol[1:] - vol[:-1]).mean()
    assert within < 0.6 * across


def test_shortcut_marker_follows_the_label(tmp_path: Path) -> None:
    kwargs = {"patients": 12, "slices_per_patient": 8, "size": 64, "seed": 1}
    plain = generate(tmp_path / "plain", shortcut_marker_prob=0.0, **kwargs)
    marked = generate(tmp_path / "marked", shortcut_marker_prob=1.0, **kwargs)
    box = marker_box(64)
    has_marker = []
    labels = []
    for row_p, row_m in zip(_rows(plain), _rows(marked), strict=True):
        assert row_p == row_m
        img_p, mask_p = _load(plain, row_p)
        img_m, mask_m = _load(marked, row_m)
        np.testing.assert_array_equal(mask_p, mask_m)  # the marker is never a lesion
        outside = np.ones(img_p.shape, dtype=bool)
        outside[box] = False
        np.testing.assert_array_equal(img_p[outside], img_m[outside])
        assert not (img_p[box] == 255).all()
        has_marker.append(bool((img_m[box] == 255).all()))
        labels.append(row_m["hemorrhage"] == "1")
    has, pos = np.array(has_marker), np.array(labels)
    assert pos.any() and (~pos).any()
    assert has[pos].all()  # p = 1: every positive carries it
    assert has[~pos].mean() < 0.5  # negatives only with p / 5
    assert np.corrcoef(has, pos)[0, 1] > 0.5
    assert "shortcut_marker_prob | 1.0" in (marked / "README.md").read_text()


@pytest.mark.parametrize(("lesion_prob", "patients"), [(0.0, 2), (1.0, 2), (0.0, 1), (1.0, 1)])
def test_extreme_lesion_prob_still_gives_a_valid_dataset(
    tmp_path: Path, lesion_prob: float, patients: int
) -> None:
    root = generate(
        tmp_path / "ds", patients=patients, slices_per_patient=3, size=32, lesion_prob=lesion_prob
    )
    labels = validate_root(root).labels_array()[:, 0]
    assert labels.max() == 1 and labels.min() == 0


def test_single_slice_dataset_is_valid(tmp_path: Path) -> None:
    root = generate(tmp_path / "ds", patients=1, slices_per_patient=1, size=32)
    assert validate_root(root).labels_array().tolist() == [[1]]


def test_readme_names_the_parameters_and_recreates_the_dataset(tmp_path: Path) -> None:
    root = generate(tmp_path / "ds", flavor="nodule", seed=7, **TINY)
    text = (root / "README.md").read_text()
    n_pos = sum(r["nodule"] == "1" for r in _rows(root))
    for needle in (
        "| flavor | nodule |",
        "| seed | 7 |",
        "| patients | 4 ",
        "| image size | 64 x 64",
        f"| slices | 16 ({n_pos} positive, {16 - n_pos} negative) |",
    ):
        assert needle in text
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    exec(code.replace('"OUT"', repr(str(tmp_path / "again"))), {})
    assert _files(tmp_path / "again") == _files(root)


def test_refuses_a_non_empty_folder_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match=r"ds: already exists and is not empty.*overwrite=True"):
        generate(out, **TINY)
    assert (out / "keep.txt").read_text() == "mine"
    generate(out, overwrite=True, **TINY)
    assert not (out / "keep.txt").exists() and (out / "labels.csv").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no partial or old folder left


def test_an_existing_empty_folder_is_used(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    assert validate_root(generate(out, **TINY)).classes == ["hemorrhage"]


def test_a_failed_run_leaves_the_old_dataset_and_no_partial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = generate(tmp_path / "ds", **TINY)
    before = _files(out)
    calls = {"n": 0}
    real = synthetic.render_volume

    def failing(*args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(synthetic, "render_volume", failing)
    with pytest.raises(RuntimeError, match="killed"):
        generate(out, seed=9, overwrite=True, **TINY)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"flavor": "fracture"},
            r"flavor 'fracture' is unknown; use one of \['hemorrhage', 'nodule'\]",
        ),
        ({"patients": 0}, r"patients=0; use an integer >= 1"),
        ({"slices_per_patient": 0}, r"slices_per_patient=0; use an integer >= 1"),
        ({"size": 16}, r"size=16; use an integer >= 32"),
        ({"size": 64.0}, r"size=64.0; use an integer >= 32"),
        ({"seed": -1}, r"seed=-1; use an integer >= 0"),
        ({"lesion_prob": 1.5}, r"lesion_prob=1.5; use a probability between 0 and 1"),
        ({"shortcut_marker_prob": -0.1}, r"shortcut_marker_prob=-0.1; use a probability"),
    ],
)
def test_bad_arguments_raise_config_error(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        generate(tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists()


def test_lesion_prob_changes_only_the_lesions(tmp_path: Path) -> None:
    few = generate(tmp_path / "few", lesion_prob=0.2, **TINY)
    many = generate(tmp_path / "many", lesion_prob=0.8, **TINY)
    both_negative = 0
    for row_f, row_m in zip(_rows(few), _rows(many), strict=True):
        if row_f["hemorrhage"] == row_m["hemorrhage"] == "0":
            both_negative += 1
            assert (few / row_f["image"]).read_bytes() == (many / row_m["image"]).read_bytes()
    assert both_negative > 0


def test_a_dataset_finished_meanwhile_by_another_process_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ds"
    real = synthetic._write_dataset

    def racing(root: Path, spec: object) -> tuple[int, tuple[int, int]]:
        result = real(root, spec)  # type: ignore[arg-type]
        out.mkdir()
        (out / "labels.csv").write_text("theirs")  # e.g. another DDP rank was faster
        return result

    monkeypatch.setattr(synthetic, "_write_dataset", racing)
    assert generate(out, **TINY) == out
    assert (out / "labels.csv").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_generated_dataset_is_not_reused_for_other_generator_arguments(tmp_path: Path) -> None:
    """The folder name leaves out shortcut_marker_prob: the recorded arguments catch it."""
    from camseg.data.synthetic import SPEC_JSON, generate_if_asked

    spec = {"flavor": "hemorrhage", "patients": 2, "slices_per_patient": 2, "size": 32, "seed": 0}
    spec["shortcut_marker_prob"] = 0.9
    root = tmp_path / "data" / "synthetic-x"
    assert generate_if_asked(root, spec, tmp_path / "data")
    assert json.loads((root / SPEC_JSON).read_text()) == spec
    assert not generate_if_asked(root, dict(spec), tmp_path / "data")  # same arguments: reused
    with pytest.raises(DatasetError) as err:
        generate_if_asked(root, {**spec, "shortcut_marker_prob": 0.0}, tmp_path / "data")
    assert "shortcut_marker_prob=0.9 (asked 0.0)" in str(err.value)
    assert "\n" not in str(err.value)
    (root / SPEC_JSON).unlink()  # generated before the record existed: not checked
    assert not generate_if_asked(root, {**spec, "shortcut_marker_prob": 0.0}, tmp_path / "data")
