"""Volumes for ``camseg-predict``: NIfTI files and DICOM series as display-oriented HU slices.

Both readers give the axial slices in the orientation of the training images (row 0
anterior, column 0 patient right, as the CT-ICH and LIDC converters write them), the
volume of one voxel from the voxel spacing, and a writer that turns the predicted slice
masks back into a NIfTI mask in the input's own voxel order and space.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from camseg.data.preprocess import display_slice
from camseg.errors import CamsegError
from camseg.optional import import_optional

VOLUME_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIX = ".dcm"
# Columns of volumes.csv, one row per volume and class.
VOLUME_COLUMNS = ("input", "mask", "class", "voxels", "voxel_mm3", "volume_ml")


@dataclass
class Volume:
    """A CT volume ready for a 2D network.

    Attributes:
        slices_hu: Z axial slices (H,W) float32 in Hounsfield units, display-oriented.
        voxel_mm3: the volume of one voxel in mm^3 (product of the voxel spacing).
        to_nifti: display-oriented (H,W) uint8 masks, one per slice -> ``.nii.gz`` bytes.
    """

    slices_hu: list[np.ndarray]
    voxel_mm3: float
    to_nifti: Callable[[Sequence[np.ndarray]], bytes]


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` file, or a file without suffix carrying the DICOM preamble ``DICM``."""
    if path.suffix.lower() == DICOM_SUFFIX:
        return True
    if path.suffix:
        return False
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _gzip_nifti(nib: Any, data: np.ndarray, affine: np.ndarray, header: Any = None) -> bytes:
    img = nib.Nifti1Image(data.astype(np.uint8), affine, header)
    img.set_data_dtype(np.uint8)
    buf = io.BytesIO()
    # mtime=0: the same prediction gives the same bytes.
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        gz.write(img.to_bytes())
    return buf.getvalue()


def read_nifti(f: Path) -> Volume:
    """A NIfTI volume, reoriented to RAS+ and cut into display-oriented axial slices."""
    nib = import_optional("nibabel", f"{f}: reading NIfTI")
    orient = nib.orientations
    try:
        img: Any = nib.load(f)
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as e:  # nibabel raises several types for damaged files
        raise CamsegError(f"{f}: cannot read NIfTI ({e})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CamsegError(f"{f}: volume has shape {data.shape}; expected 3D")
    start = orient.io_orientation(img.affine)
    ras = orient.axcodes2ornt(("R", "A", "S"))
    canonical = orient.apply_orientation(data, orient.ornt_transform(start, ras))
    slices = [
        np.ascontiguousarray(display_slice(canonical[:, :, z])) for z in range(canonical.shape[2])
    ]
    zooms = img.header.get_zooms()[:3]

    def to_nifti(masks: Sequence[np.ndarray]) -> bytes:
        # Undo the display transform (row 0 anterior, column 0 right) back to canonical x, y.
        vol = np.stack([m[::-1, ::-1].T for m in masks], axis=2)
        vol = orient.apply_orientation(vol, orient.ornt_transform(ras, start))
        header = img.header.copy()
        header.set_data_dtype(np.uint8)
        return _gzip_nifti(nib, vol, img.affine, header)

    return Volume(slices, float(np.prod(zooms)), to_nifti)


def _position(ds: Any, path: Path) -> np.ndarray:
    ipp = ds.get("ImagePositionPatient")
    if ipp is None or len(ipp) != 3:
        raise CamsegError(f"{path}: no ImagePositionPatient; cannot place the slice")
    return np.asarray([float(v) for v in ipp])


def read_dicom(folder: Path) -> Volume:
    """The one DICOM series in ``folder``: slices sorted by ImagePositionPatient (then
    InstanceNumber), stored values mapped by RescaleSlope/RescaleIntercept to HU.

    Stored pixel order is kept: for the usual axial orientation (ImageOrientationPatient
    ``[1,0,0,0,1,0]``) row 0 is anterior and column 0 patient right, like the training
    images. The mask NIfTI gets the series' patient geometry (LPS turned into RAS).
    """
    pydicom = import_optional("pydicom", f"{folder}: reading DICOM")
    nib = import_optional("nibabel", f"{folder}: writing the NIfTI mask of a DICOM series")
    from camseg.data.prepare.dicom import read_dicom_series
    from camseg.errors import DatasetError

    try:
        series = read_dicom_series(folder)
    except DatasetError as e:
        raise CamsegError(str(e).removesuffix("; check SRC")) from None
    uids = set()
    for p in series.files:
        uids.add(str(pydicom.dcmread(p, stop_before_pixels=True).get("SeriesInstanceUID", "")))
    if len(uids) > 1:
        raise CamsegError(
            f"{folder}: {len(uids)} DICOM series in one folder; give a folder per series"
        )
    first = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    last = pydicom.dcmread(series.files[-1], stop_before_pixels=True)
    iop = np.asarray([float(v) for v in first.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])])
    row_dir, col_dir = iop[:3], iop[3:]  # along a row (column index grows), along a column
    d_row, d_col = series.pixel_spacing  # PixelSpacing: between rows, between columns
    n = len(series.files)
    p0, p1 = _position(first, series.files[0]), _position(last, series.files[-1])
    if n > 1:
        step = (p1 - p0) / (n - 1)
    else:
        thickness = float(first.get("SliceThickness", 0) or 0)
        if thickness <= 0:
            raise CamsegError(
                f"{folder}: one slice without SliceThickness; its voxel volume is unknown"
            )
        step = np.cross(row_dir, col_dir) * thickness
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * d_col, col_dir * d_row, step, p0
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's LPS -> NIfTI's RAS
    voxel_mm3 = float(abs(np.linalg.det(lps[:3, :3])))
    slices = [series.volume_hu[k] for k in range(n)]

    def to_nifti(masks: Sequence[np.ndarray]) -> bytes:
        # Array axes (column i, row j, slice k), as the affine above reads them.
        return _gzip_nifti(nib, np.stack([m.T for m in masks], axis=2), affine)

    return Volume(slices, voxel_mm3, to_nifti)


def volume_rows(
    source: str, mask: str, labels: np.ndarray, class_names: Sequence[str], voxel_mm3: float
) -> list[list[object]]:
    """One ``VOLUME_COLUMNS`` row per class: voxels of class k and their volume in mL."""
    rows: list[list[object]] = []
    for k, name in enumerate(class_names, start=1):
        voxels = int(np.count_nonzero(labels == k))
        rows.append(
            [source, mask, name, voxels, f"{voxel_mm3:.6g}", f"{voxels * voxel_mm3 / 1000:.6f}"]
        )
    return rows
