"""CT-ICH labels: the per-slice diagnosis CSV, and how a slice's row and mask agree.

Both releases ship a diagnosis CSV with one row per slice (``PatientNumber``,
``SliceNumber``, five subtype columns, ``No_Hemorrhage``). A converted slice pairs its row
with the release's mask; :func:`check_mask` reports where they disagree and
:func:`mask_for` turns the binary mask into the class-index mask to write.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camseg.data.prepare.common import Issue
from camseg.errors import DatasetError

SUBTYPES = ("Intraventricular", "Intraparenchymal", "Subarachnoid", "Epidural", "Subdural")
NIFTI_CSV = "hemorrhage_diagnosis_raw_ct.csv"
JPG_CSV = "hemorrhage_diagnosis.csv"
_REQUIRED_COLUMNS = ("PatientNumber", "SliceNumber", *SUBTYPES, "No_Hemorrhage")


@dataclass(frozen=True)
class DiagnosisRow:
    """One slice of the diagnosis CSV."""

    patient: int
    slice: int
    subtypes: tuple[int, ...]
    no_hemorrhage: int
    line: int

    @property
    def hemorrhage(self) -> int:
        return 1 - self.no_hemorrhage


@dataclass(frozen=True)
class CtIchSlice:
    """A converted slice before it becomes a labels.csv row."""

    patient: int
    row: DiagnosisRow
    image: np.ndarray
    mask: np.ndarray | None  # bool (H,W), None when the patient has no mask file


def read_diagnosis_csv(path: Path) -> tuple[dict[tuple[int, int], DiagnosisRow], list[Issue]]:
    """Read a CT-ICH diagnosis CSV keyed by (patient, slice); duplicates are reported."""
    if not path.is_file():
        raise DatasetError(f"{path}: not found; point SRC at the unzipped CT-ICH release folder")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in _REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DatasetError(
                f"{path}: missing column(s) {missing} (header is {header}); is this the CT-ICH diagnosis CSV?"
            )
        # reader.line_num after each row: the file line to quote in messages
        raw_rows = [
            (reader.line_num, {k.strip(): (v or "").strip() for k, v in r.items() if k is not None})
            for r in reader
        ]
    rows: dict[tuple[int, int], DiagnosisRow] = {}
    issues: list[Issue] = []
    for i, r in raw_rows:
        if not any(r.values()):
            continue  # a row of empty cells
        values = {c: _binary_or_int(path, i, c, r.get(c, "")) for c in _REQUIRED_COLUMNS}
        for c in (*SUBTYPES, "No_Hemorrhage"):
            if values[c] not in (0, 1):
                raise DatasetError(
                    f"{path}: line {i}: column '{c}' has value {values[c]}; it must be 0 or 1"
                )
        row = DiagnosisRow(
            patient=values["PatientNumber"],
            slice=values["SliceNumber"],
            subtypes=tuple(values[c] for c in SUBTYPES),
            no_hemorrhage=values["No_Hemorrhage"],
            line=i,
        )
        key = (row.patient, row.slice)
        if key in rows:
            same = (
                rows[key].subtypes == row.subtypes and rows[key].no_hemorrhage == row.no_hemorrhage
            )
            issues.append(
                Issue(
                    "duplicate_row",
                    f"{row.patient:03d}",
                    row.slice,
                    path.name,
                    f"line {i} repeats the slice of line {rows[key].line}"
                    f"{'' if same else ' with different labels'}; the first row is used",
                )
            )
            continue
        rows[key] = row
        if (row.no_hemorrhage == 1) == any(row.subtypes):
            issues.append(
                Issue(
                    "row_contradiction",
                    f"{row.patient:03d}",
                    row.slice,
                    path.name,
                    f"line {i}: No_Hemorrhage={row.no_hemorrhage} but subtypes {dict(zip(SUBTYPES, row.subtypes, strict=True))}; "
                    "the hemorrhage label follows No_Hemorrhage",
                )
            )
    return rows, issues


def _binary_or_int(path: Path, line: int, column: str, value: str) -> int:
    try:
        f = float(value)
    except ValueError:
        raise DatasetError(
            f"{path}: line {line}: column '{column}' has value '{value}'; expected an integer"
        ) from None
    if f != int(f):
        raise DatasetError(
            f"{path}: line {line}: column '{column}' has value '{value}'; expected an integer"
        )
    return int(f)


def check_mask(sl: CtIchSlice, issues: list[Issue], csv_name: str) -> None:
    if sl.mask is None:
        return
    pid, has_fg = f"{sl.patient:03d}", bool(sl.mask.any())
    if sl.row.hemorrhage and not has_fg:
        issues.append(
            Issue(
                "label_without_mask",
                pid,
                sl.row.slice,
                csv_name,
                f"line {sl.row.line} says hemorrhage but the mask slice is empty; kept as labelled",
            )
        )
    elif not sl.row.hemorrhage and has_fg:
        issues.append(
            Issue(
                "mask_without_label",
                pid,
                sl.row.slice,
                csv_name,
                f"line {sl.row.line} says No_Hemorrhage but the mask slice has {int(sl.mask.sum())} pixels; kept as labelled",
            )
        )


def mask_for(sl: CtIchSlice, subtypes: bool) -> np.ndarray | None:
    """The class-index mask to write, or None when the pixels' classes are unknown.

    CT-ICH masks mark hemorrhage without its subtype. With ``subtypes`` a mask is written
    only where that is unambiguous: a slice with exactly one subtype (all foreground ->
    that class) or a slice with none and an empty mask (all background).
    """
    if sl.mask is None:
        return None
    if not subtypes:
        return sl.mask.astype(np.uint8)
    present = [i for i, v in enumerate(sl.row.subtypes) if v]
    if len(present) == 1:
        return sl.mask.astype(np.uint8) * np.uint8(present[0] + 1)
    if not present and not sl.mask.any():
        return np.zeros(sl.mask.shape, dtype=np.uint8)
    return None
