"""The JPG release of CT-ICH: ``Patients_CT/NNN/brain/<n>.jpg`` and ``<n>_HGE_Seg.jpg`` masks.

The images are already brain-windowed; masks exist only for hemorrhage slices, so a slice
without one gets an all-background mask.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from camseg.data.prepare.common import Issue
from camseg.data.prepare.ctich_labels import JPG_CSV, CtIchSlice, DiagnosisRow
from camseg.data.progress import progress as progress_of
from camseg.errors import DatasetError

_JPG_NAME = re.compile(r"^(\d+)\.jpe?g$", re.IGNORECASE)
_JPG_MASK_NAME = re.compile(r"^(\d+)_HGE_Seg\.jpe?g$", re.IGNORECASE)


def patient_folders(root: Path) -> dict[int, Path]:
    """``Patients_CT/NNN`` folders by patient number."""
    return {
        int(p.name): p for p in (root / "Patients_CT").iterdir() if p.is_dir() and p.name.isdigit()
    }


def iter_jpg_slices(
    root: Path,
    rows: dict[tuple[int, int], DiagnosisRow],
    patients: list[int],
    folders: dict[int, Path],
    issues: list[Issue],
    progress: bool,
) -> Iterator[CtIchSlice]:
    for patient in progress_of(patients, desc="ct-ich", unit="patient", enabled=progress):
        pid = f"{patient:03d}"
        brain = folders[patient] / "brain"
        images: dict[int, Path] = {}
        masks: dict[int, Path] = {}
        for p in sorted(brain.iterdir()) if brain.is_dir() else []:
            if m := _JPG_NAME.match(p.name):
                images[int(m.group(1))] = p
            elif m := _JPG_MASK_NAME.match(p.name):
                masks[int(m.group(1))] = p
        patient_rows = {s: r for (p, s), r in rows.items() if p == patient}
        for s in sorted(set(images) - set(patient_rows)):
            issues.append(
                Issue(
                    "slice_without_row",
                    pid,
                    s,
                    rel_path(images[s], root),
                    f"image has no row in {JPG_CSV}; slice not converted",
                )
            )
        for s in sorted(set(masks) - set(images)):
            issues.append(
                Issue(
                    "mask_without_image",
                    pid,
                    s,
                    rel_path(masks[s], root),
                    "mask file has no image beside it; mask not converted",
                )
            )
        for s in sorted(patient_rows):
            row = patient_rows[s]
            if s not in images:
                issues.append(
                    Issue(
                        "row_without_slice",
                        pid,
                        s,
                        JPG_CSV,
                        f"line {row.line}: no image {pid}/brain/{s}.jpg; row not converted",
                    )
                )
                continue
            image = _read_gray(images[s])
            mask = np.zeros(image.shape, dtype=bool)
            if s in masks:
                seg = _read_gray(masks[s])
                if seg.shape != image.shape:
                    raise DatasetError(
                        f"{masks[s]}: mask is {seg.shape[1]}x{seg.shape[0]} but {images[s].name} is "
                        f"{image.shape[1]}x{image.shape[0]}; re-extract the release"
                    )
                mask = seg > 127  # JPEG ringing: binarise at mid-gray
            yield CtIchSlice(patient, row, image, mask)


def _read_gray(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"), dtype=np.uint8).copy()
    except Exception as e:  # PIL raises several types for damaged files
        raise DatasetError(f"{path}: cannot read image ({e}); re-extract the release") from None


def rel_path(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()
