"""Reading ``labels.csv`` and checking it, as a file and row by row (the format:
:mod:`camseg.data.folder`).

Problems of the file as a whole (no labels.csv, no image column, ...) raise at once;
problems of single rows are collected in a :class:`Problems`.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from camseg.constants import RESERVED_COLUMNS, SPLITS
from camseg.errors import DatasetError, DatasetProblems

LABELS_CSV = "labels.csv"
# Problems kept for the report (all are counted): enough to see a pattern, not a flood.
PROBLEM_CAP = 20


@dataclass(frozen=True)
class Sample:
    """One row of ``labels.csv``.

    Attributes:
        id: unique sample id derived from the image path (used to name artifacts).
        image: image path relative to the root.
        mask: mask path relative to the root, or None.
        group: patient id (the image id when the CSV has no ``group`` column).
        split: the row's ``split`` value, or None when not given.
        slice: the row's ``slice`` value, or None.
        labels: one 0/1 value per class.
    """

    id: str
    image: str
    mask: str | None
    group: str
    split: str | None
    slice: int | None
    labels: tuple[int, ...]


def sample_id(image: str) -> str:
    """Artifact-safe id of an image path: ``images/a/b.png`` -> ``a__b`` (first folder kept if not 'images')."""
    parts = list(PurePosixPath(image).with_suffix("").parts)
    if len(parts) > 1 and parts[0] in ("images", "image", "imgs"):
        parts = parts[1:]
    return "__".join(parts)


def _safe_relative(root: Path, value: str, where: str, column: str) -> str:
    if not value:
        raise DatasetError(
            f"{where}: column '{column}' is empty; give a path relative to the dataset root"
        )
    p = PurePosixPath(value.replace("\\", "/"))
    if p.is_absolute() or value.startswith(("/", "\\")) or (len(value) > 1 and value[1] == ":"):
        raise DatasetError(
            f"{where}: column '{column}' is the absolute path '{value}'; paths must be relative to the dataset root {root}"
        )
    if ".." in p.parts:
        raise DatasetError(
            f"{where}: column '{column}' path '{value}' escapes the dataset root; remove '..' and keep files under {root}"
        )
    return str(p)


def read_csv(csv_path: Path) -> tuple[list[str], list[dict[str, str]], list[int]]:
    """Header, rows (stripped cells) and each row's line number in the file (blank lines are skipped)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            # Spreadsheet exports often end rows with empty unnamed columns: harmless while empty.
            unnamed = [j for j, h in enumerate(header) if not h]
            rows: list[dict[str, str]] = []
            lines: list[int] = []
            for cells in reader:
                if not any(c.strip() for c in cells):
                    continue
                if len(cells) > len(header):
                    raise DatasetError(
                        f"{csv_path}: line {reader.line_num} has {len(cells)} cells but the header has "
                        f"{len(header)} columns; quote cells that contain commas or add the missing column names"
                    )
                cells = [c.strip() for c in cells] + [""] * (len(header) - len(cells))
                for j in unnamed:
                    if cells[j]:
                        raise DatasetError(
                            f"{csv_path}: line {reader.line_num} has the value '{cells[j]}' in column {j + 1}, "
                            "which has no name in the header; name the column or remove the value"
                        )
                rows.append({h: c for h, c in zip(header, cells, strict=True) if h})
                lines.append(reader.line_num)
    except (UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(
            f"{csv_path}: not a readable UTF-8 CSV file ({e}); save it as UTF-8 CSV"
        ) from None
    return [h for h in header if h], rows, lines


class Problems:
    """Problems found in one dataset root: every one counted, the first ``cap`` kept."""

    def __init__(self, root: Path, cap: int = PROBLEM_CAP) -> None:
        self.root = root
        self.cap = cap
        self.items: list[str] = []
        self.total = 0

    def add(self, message: str) -> None:
        self.total += 1
        if len(self.items) < self.cap:
            self.items.append(message)

    def raise_if_any(self) -> None:
        if self.total:
            raise DatasetProblems(self.root, self.items, self.total)


def check_csv_file(root: Path, check_files: bool) -> tuple[Path, Path]:
    """``ROOT/labels.csv`` and the resolved root, once both exist and (``check_files``) the
    file, links followed, lies inside the root."""
    csv_path = root / LABELS_CSV
    if not root.is_dir():
        raise DatasetError(
            f"{root}: dataset root does not exist; create it or point data.root at a dataset folder"
        )
    if not csv_path.is_file():
        raise DatasetError(
            f"{csv_path}: not found; a dataset root needs a labels.csv (see README, 'Dataset format')"
        )
    real_root = root.resolve()
    if check_files and not csv_path.resolve().is_relative_to(real_root):
        raise DatasetError(
            f"{csv_path}: resolves to {csv_path.resolve()}, outside the dataset root {real_root}; "
            "copy the file into the root instead of linking it"
        )
    return csv_path, real_root


def check_header(
    csv_path: Path, header: list[str], rows: list[dict[str, str]], classes: list[str] | None
) -> tuple[list[str], list[str]]:
    """The class columns (``classes``, default all non-reserved ones) and the other
    non-reserved columns; raises on a header without images or classes, or no rows."""
    if "image" not in header:
        raise DatasetError(
            f"{csv_path}: no 'image' column (header is {header}); add one with image paths"
        )
    dupe_cols = [c for c, n in Counter(header).items() if n > 1]
    if dupe_cols:
        raise DatasetError(
            f"{csv_path}: duplicate column(s) {dupe_cols}; every column name must be unique"
        )
    candidate = [c for c in header if c not in RESERVED_COLUMNS]
    if classes is None:
        classes = candidate
    else:
        classes = list(classes)
        missing = [c for c in classes if c not in header]
        if missing:
            raise DatasetError(
                f"{csv_path}: class column(s) {missing} not found; columns are {header}"
            )
    if not classes:
        raise DatasetError(
            f"{csv_path}: no class column; add one 0/1 column per class besides {list(RESERVED_COLUMNS)}"
        )
    if not rows:
        raise DatasetError(f"{csv_path}: no rows; list one image per row")
    return list(classes), [c for c in candidate if c not in classes]


def parse_rows(
    csv_path: Path,
    real_root: Path,
    rows: list[dict[str, str]],
    lines: list[int],
    classes: list[str],
    check_files: bool,
    problems: Problems,
) -> tuple[list[Sample], list[int]]:
    """The samples of the rows without problems, and their row numbers; each faulty row's
    problem goes to ``problems`` and the row is left out."""
    root = csv_path.parent
    samples: list[Sample] = []
    row_numbers: list[int] = []
    seen_images: dict[str, int] = {}
    seen_ids: dict[str, int] = {}
    for i, (row, line) in enumerate(zip(rows, lines, strict=True), start=1):
        where = f"{csv_path}: row {i} (line {line})"
        try:
            sample = _parse_row(root, row, where, classes, seen_images, seen_ids, i)
            if check_files:
                _check_row_files(root, real_root, sample, where)
        except DatasetError as e:
            problems.add(str(e))
            continue
        samples.append(sample)
        row_numbers.append(i)
    return samples, row_numbers


def _parse_row(
    root: Path,
    row: dict[str, str],
    where: str,
    classes: list[str],
    seen_images: dict[str, int],
    seen_ids: dict[str, int],
    i: int,
) -> Sample:
    image = _safe_relative(root, row.get("image", ""), where, "image")
    if image in seen_images:
        raise DatasetError(
            f"{where}: image '{image}' is listed again (first in row {seen_images[image]}); keep one row per image"
        )
    seen_images[image] = i
    mask = row.get("mask") or None
    if mask is not None:
        mask = _safe_relative(root, mask, where, "mask")
    labels = []
    for c in classes:
        v = row.get(c, "")
        if v not in ("0", "1"):
            shown = v if v else "empty"
            raise DatasetError(
                f"{where}: column '{c}' has value {shown}; class columns must be 0 or 1"
            )
        labels.append(int(v))
    split = row.get("split") or None
    if split is not None and split not in SPLITS:
        raise DatasetError(
            f"{where}: column 'split' has value '{split}'; use one of {list(SPLITS)} or leave it empty"
        )
    slice_v = row.get("slice") or None
    slice_i = None
    if slice_v is not None:
        try:
            slice_i = int(slice_v)
        except ValueError:
            raise DatasetError(
                f"{where}: column 'slice' has value '{slice_v}'; slice indices must be integers"
            ) from None
    sid = sample_id(image)
    if sid in seen_ids:
        raise DatasetError(
            f"{where}: image '{image}' maps to the same sample id '{sid}' as row {seen_ids[sid]}; rename one of the files"
        )
    seen_ids[sid] = i
    group = row.get("group") or sid
    return Sample(sid, image, mask, group, split, slice_i, tuple(labels))


def _check_row_files(root: Path, real_root: Path, s: Sample, where: str) -> None:
    """The row's files exist and, symlinks followed, lie inside the dataset root."""
    if not (root / s.image).is_file():
        raise DatasetError(
            f"{where}: image file '{s.image}' not found under {root}; fix the path or add the file"
        )
    if s.mask is not None and not (root / s.mask).is_file():
        raise DatasetError(
            f"{where}: mask file '{s.mask}' not found under {root}; fix the path or clear the 'mask' cell"
        )
    for column, rel in (("image", s.image), ("mask", s.mask)):
        if rel is None:
            continue
        real = (root / rel).resolve()
        if not real.is_relative_to(real_root):
            raise DatasetError(
                f"{where}: {column} file '{rel}' resolves to {real}, outside the dataset root {real_root} "
                "(a symbolic link); copy the file into the root instead of linking it"
            )


def check_split_groups(csv_path: Path, samples: list[Sample], problems: Problems) -> None:
    split_of: dict[str, str] = {}
    reported: set[str] = set()
    for s in samples:
        if s.split is None:
            continue
        prev = split_of.setdefault(s.group, s.split)
        if prev != s.split and s.group not in reported:
            reported.add(s.group)
            problems.add(
                f"{csv_path}: group '{s.group}' is in both '{prev}' and '{s.split}' splits; "
                "slices of one patient must stay on one side"
            )
