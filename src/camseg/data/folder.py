"""The camseg dataset folder format: ``labels.csv`` beside image and mask files.

``labels.csv`` columns: ``image`` (required, path relative to the root), optional
``mask`` (single-channel PNG of class indices, 0 = background, k = class k),
optional ``group`` (patient id: splits never cut a group), optional ``split``
(``train``/``val``/``test``), optional ``slice`` (index inside the patient's volume),
and one 0/1 column per class. A row whose class columns are all 0 is a negative image.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from camseg.constants import IGNORE_INDEX, RESERVED_COLUMNS, SPLITS
from camseg.errors import DatasetError, DatasetProblems
from camseg.utils.io import read_image, read_mask

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


@dataclass
class DatasetIndex:
    """A validated ``labels.csv``: the classes and the samples of one dataset root."""

    root: Path
    classes: list[str]
    samples: list[Sample]
    extra_columns: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def has_masks(self) -> bool:
        return any(s.mask is not None for s in self.samples)

    def labels_array(self) -> np.ndarray:
        """Image-level labels, (N,K) uint8."""
        return np.array([s.labels for s in self.samples], dtype=np.uint8).reshape(
            len(self), len(self.classes)
        )

    def by_id(self) -> dict[str, Sample]:
        return {s.id: s for s in self.samples}

    def path(self, relative: str) -> Path:
        return self.root / relative


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


def _read_csv(csv_path: Path) -> tuple[list[str], list[dict[str, str]], list[int]]:
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


def load_index(
    root: str | Path,
    classes: list[str] | None = None,
    check_files: bool = True,
    require_positive: bool = True,
) -> DatasetIndex:
    """Read and validate ``ROOT/labels.csv`` (structure and file existence; not pixels).

    Args:
        root: dataset root.
        classes: class columns to use, in this order; default all non-reserved columns.
        check_files: check that every image and mask file exists and, symlinks resolved,
            lies inside the root.
        require_positive: refuse a class with no positive row (it could never be learned).

    Raises:
        DatasetError: with the file, row and column at fault and the fix; every faulty row
            is reported (a :class:`DatasetProblems` when there are several).
    """
    problems = Problems(Path(root))
    index, _ = _load_index(root, classes, check_files, require_positive, problems)
    problems.raise_if_any()
    return index


def _load_index(
    root: str | Path,
    classes: list[str] | None,
    check_files: bool,
    require_positive: bool,
    problems: Problems,
) -> tuple[DatasetIndex, list[int]]:
    """The index of the rows without problems, and each kept sample's row number.

    Problems of the file as a whole (no labels.csv, no image column) raise at once; problems
    of single rows go to ``problems`` and the row is left out.
    """
    root = Path(root)
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
    header, rows, lines = _read_csv(csv_path)
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

    # With rows left out, "no positive row" could be a consequence, not a problem of its own.
    if require_positive and not problems.total:
        counts = np.array([s.labels for s in samples]).sum(axis=0)
        for c, n in zip(classes, counts, strict=True):
            if n == 0:
                problems.add(
                    f"{csv_path}: class '{c}' has no positive row; drop the column or add images that show it"
                )
    _check_split_groups(csv_path, samples, problems)
    extra = [c for c in candidate if c not in classes]
    index = DatasetIndex(root=root, classes=list(classes), samples=samples, extra_columns=extra)
    return index, row_numbers


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


def _check_split_groups(csv_path: Path, samples: list[Sample], problems: Problems) -> None:
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


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header."""
    with Image.open(path) as im:
        return im.height, im.width


def validate_root(root: str | Path, classes: list[str] | None = None) -> DatasetIndex:
    """Full validation: :func:`load_index` plus every image and mask decoded and compared.

    Raises:
        DatasetError: unreadable/truncated image, mask not single-channel, mask size
            different from its image, mask values that are not class indices; a
            :class:`DatasetProblems` listing them all when there are several.
    """
    index, problems, _ = check_root(root, classes)
    problems.raise_if_any()
    return index


def check_root(
    root: str | Path,
    classes: list[str] | None = None,
    cache: dict[str, list[int]] | None = None,
    cap: int = PROBLEM_CAP,
) -> tuple[DatasetIndex, Problems, int]:
    """Check everything and collect the problems: ``(index of the good rows, problems, #decoded)``.

    The code behind ``camseg-data check`` and the preflight of every run. ``cache`` maps a
    sample's files to their (size, mtime) stamp when they last passed; a sample whose stamp is
    unchanged is not decoded again, and samples that pass are added to it.

    Raises:
        DatasetError: a problem of the root as a whole (no labels.csv, no image column, ...).
    """
    problems = Problems(Path(root), cap)
    index, rows = _load_index(root, classes, True, True, problems)
    k = len(index.classes)
    decoded = 0
    for s, i in zip(index.samples, rows, strict=True):
        key = f"{s.image}\t{s.mask or ''}"
        try:
            stamp = _stamp(index, s, k)
        except OSError as e:
            problems.add(f"{index.path(s.image)} ({LABELS_CSV} row {i}): cannot read ({e})")
            continue
        if cache is not None and cache.get(key) == stamp:
            continue
        decoded += 1
        found = sample_problems(index, s, f"{LABELS_CSV} row {i}")
        for message in found:
            problems.add(message)
        if cache is not None:
            if found:
                cache.pop(key, None)
            else:
                cache[key] = stamp
    return index, problems, decoded


def _stamp(index: DatasetIndex, s: Sample, k: int) -> list[int]:
    """What a cached result depends on: each file's size and mtime (ns), and the class count."""
    out = []
    for rel in (s.image, s.mask):
        if rel is not None:
            st = os.stat(index.path(rel))
            out += [st.st_size, st.st_mtime_ns]
    return [*out, k]


def sample_problems(index: DatasetIndex, s: Sample, row: str) -> list[str]:
    """Decode one sample's image and mask; the problems found (empty when it is usable).

    Masks are single-channel, of their image's size, with values 0 (background), 1..K (one
    per class) or 255 (ignore).
    """
    k = len(index.classes)
    ip = index.path(s.image)
    try:
        img = read_image(ip)
    except Exception as e:  # PIL raises several types for bad files
        return [f"{ip} ({row}): cannot read image ({e}); re-export the file or remove its row"]
    if s.mask is None:
        return []
    mp = index.path(s.mask)
    try:
        m = read_mask(mp)
    except Exception as e:
        return [
            f"{mp} ({row}): cannot read mask ({e}); masks are single-channel PNGs of class indices"
        ]
    out = []
    if m.shape != img.shape[:2]:
        out.append(
            f"{mp} ({row}): mask is {m.shape[1]}x{m.shape[0]} but image '{s.image}' is "
            f"{img.shape[1]}x{img.shape[0]}; masks must have their image's size"
        )
    bad = np.setdiff1d(np.unique(m), [*range(k + 1), IGNORE_INDEX])
    if bad.size:
        names = ", ".join(f"{j} = {c}" for j, c in enumerate(index.classes, start=1))
        out.append(
            f"{mp} ({row}): mask has value(s) {bad.tolist()}; allowed are 0 (background) to {k} "
            f"({names}) and {IGNORE_INDEX} (ignore); re-export the mask with these class indices "
            "or add the missing class column(s) to labels.csv"
        )
    return out


def summarize(index: DatasetIndex, with_sizes: bool = True) -> dict:
    """Counts for ``camseg-data check``: samples, classes, positives, groups, masks, sizes."""
    labels = index.labels_array()
    summary: dict = {
        "root": str(index.root),
        "samples": len(index),
        "classes": index.classes,
        "positives": {c: int(n) for c, n in zip(index.classes, labels.sum(axis=0), strict=True)},
        "negatives": int((labels.sum(axis=1) == 0).sum()),
        "groups": len({s.group for s in index.samples}),
        "masks": sum(s.mask is not None for s in index.samples),
        "splits": dict(Counter(s.split or "unassigned" for s in index.samples)),
    }
    if with_sizes:
        sizes = Counter(image_size(index.path(s.image)) for s in index.samples)
        summary["image_sizes"] = {f"{w}x{h}": n for (h, w), n in sizes.most_common()}
    return summary
