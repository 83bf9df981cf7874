"""Read one DICOM CT series from a folder into a HU volume sorted by slice position."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from camseg.data.prepare.common import Issue
from camseg.errors import DatasetError
from camseg.optional import import_optional

if TYPE_CHECKING:
    import pydicom

_AXIAL = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


@dataclass
class DicomSeries:
    """A CT series as a volume.

    Attributes:
        volume_hu: (Z,H,W) float32 Hounsfield units (stored value * RescaleSlope + RescaleIntercept).
        z: (Z,) ImagePositionPatient z of each slice, ascending.
        files: (Z,) source file of each slice.
        pixel_spacing: (row, column) spacing in mm.
        issues: what was odd about the series (duplicate positions, non-axial orientation).
    """

    volume_hu: np.ndarray
    z: np.ndarray
    files: list[Path]
    pixel_spacing: tuple[float, float]
    issues: list[Issue] = field(default_factory=list)


_Slice = tuple[float, int, Path, "pydicom.Dataset"]  # (z, InstanceNumber, file, dataset)


def _read_slices(folder: Path, series_uid: str | None) -> list[_Slice]:
    """Read the image files of ``folder`` (of ``series_uid`` when given), unsorted."""
    dicom = import_optional("pydicom", "reading DICOM")
    invalid_dicom = import_optional("pydicom.errors", "reading DICOM").InvalidDicomError
    slices: list[_Slice] = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = dicom.dcmread(path)
        except (invalid_dicom, OSError):
            continue
        if "PixelData" not in ds:
            continue
        if series_uid is not None and str(ds.get("SeriesInstanceUID", "")).strip() != series_uid:
            continue
        ipp = ds.get("ImagePositionPatient")
        if ipp is None or len(ipp) != 3:
            raise DatasetError(
                f"{path}: no ImagePositionPatient; cannot order the slices of this series"
            )
        slices.append((float(ipp[2]), int(ds.get("InstanceNumber", 0) or 0), path, ds))
    return slices


def _drop_duplicate_positions(
    slices: list[_Slice], patient: str, issues: list[Issue]
) -> list[_Slice]:
    """Sort by (z, InstanceNumber) and keep the first slice at each z, reporting the others."""
    slices.sort(key=lambda s: (s[0], s[1]))
    kept: list[_Slice] = []
    for s in slices:
        if kept and s[0] == kept[-1][0]:
            issues.append(
                Issue(
                    "duplicate_position",
                    patient,
                    None,
                    s[2].name,
                    f"same z={s[0]:g} as {kept[-1][2].name}; the lower InstanceNumber is kept",
                )
            )
            continue
        kept.append(s)
    return kept


def _stack_hu(kept: list[_Slice]) -> np.ndarray:
    """Stack the slices into a (Z,H,W) float32 HU volume; all must have the first's size."""
    first = kept[0][3]
    shape = (int(first.Rows), int(first.Columns))
    volume = np.empty((len(kept), *shape), dtype=np.float32)
    for k, (_, _, path, item) in enumerate(kept):
        if (int(item.Rows), int(item.Columns)) != shape:
            raise DatasetError(
                f"{path}: slice is {item.Columns}x{item.Rows} but the series is "
                f"{shape[1]}x{shape[0]}; the folder mixes series"
            )
        slope = float(item.get("RescaleSlope", 1) or 1)
        intercept = float(item.get("RescaleIntercept", 0) or 0)
        volume[k] = item.pixel_array.astype(np.float32) * slope + intercept
    return volume


def read_dicom_series(
    folder: Path, series_uid: str | None = None, patient: str = ""
) -> DicomSeries:
    """Read every image file of one series in ``folder`` (not recursive), sorted by z.

    Files that are not DICOM, carry no pixel data, or belong to another series (when
    ``series_uid`` is given) are skipped. Of several slices at the same z the one with the
    lower InstanceNumber is kept, as pylidc does, and the others are reported.

    Raises:
        DatasetError: no usable slice, a slice without ImagePositionPatient, or slices of
            different sizes.
    """
    if not folder.is_dir():
        raise DatasetError(f"{folder}: DICOM folder not found; check SRC")
    slices = _read_slices(folder, series_uid)
    if not slices:
        wanted = f" of series {series_uid}" if series_uid else ""
        raise DatasetError(f"{folder}: no DICOM image{wanted} found; check SRC")

    issues: list[Issue] = []
    kept = _drop_duplicate_positions(slices, patient, issues)
    first = kept[0][3]
    iop = first.get("ImageOrientationPatient")
    if iop is not None and not np.allclose(np.asarray(iop, dtype=float), _AXIAL, atol=1e-3):
        issues.append(
            Issue(
                "non_standard_orientation",
                patient,
                None,
                kept[0][2].name,
                f"ImageOrientationPatient {list(map(float, iop))} is not [1,0,0,0,1,0]; "
                "slices are written in stored pixel order",
            )
        )
    volume = _stack_hu(kept)
    spacing = first.get("PixelSpacing", [1.0, 1.0])
    return DicomSeries(
        volume_hu=volume,
        z=np.array([s[0] for s in kept], dtype=np.float64),
        files=[s[2] for s in kept],
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        issues=issues,
    )
