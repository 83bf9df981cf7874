"""The camseg dataset folder format: ``labels.csv`` beside image and mask files.

``labels.csv`` columns: ``image`` (required, path relative to the root), optional
``mask`` (single-channel PNG of class indices, 0 = background, k = class k),
optional ``group`` (patient id: splits never cut a group), optional ``split``
(``train``/``val``/``test``), optional ``slice`` (index inside the patient's volume),
and one 0/1 column per class. A row whose class columns are all 0 is a negative image.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from camseg.constants import RESERVED_COLUMNS, SPLITS
from camseg.errors import DatasetError
from camseg.utils.io import read_image, read_mask

LABELS_CSV = "labels.csv"


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
        check_files: check that every image and mask file exists.
        require_positive: refuse a class with no positive row (it could never be learned).

    Raises:
        DatasetError: with the file, row and column at fault and the fix.
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
    seen_images: dict[str, int] = {}
    seen_ids: dict[str, int] = {}
    for i, (row, line) in enumerate(zip(rows, lines, strict=True), start=1):
        where = f"{csv_path}: row {i} (line {line})"
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
        if check_files:
            if not (root / image).is_file():
                raise DatasetError(
                    f"{where}: image file '{image}' not found under {root}; fix the path or add the file"
                )
            if mask is not None and not (root / mask).is_file():
                raise DatasetError(
                    f"{where}: mask file '{mask}' not found under {root}; fix the path or clear the 'mask' cell"
                )
        samples.append(Sample(sid, image, mask, group, split, slice_i, tuple(labels)))

    if require_positive:
        counts = np.array([s.labels for s in samples]).sum(axis=0)
        for c, n in zip(classes, counts, strict=True):
            if n == 0:
                raise DatasetError(
                    f"{csv_path}: class '{c}' has no positive row; drop the column or add images that show it"
                )
    _check_split_groups(csv_path, samples)
    extra = [c for c in candidate if c not in classes]
    return DatasetIndex(root=root, classes=list(classes), samples=samples, extra_columns=extra)


def _check_split_groups(csv_path: Path, samples: list[Sample]) -> None:
    split_of: dict[str, str] = {}
    for s in samples:
        if s.split is None:
            continue
        prev = split_of.setdefault(s.group, s.split)
        if prev != s.split:
            raise DatasetError(
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
            different from its image, mask values that are not class indices.
    """
    index = load_index(root, classes=classes, check_files=True)
    k = len(index.classes)
    for i, s in enumerate(index.samples, start=1):
        row = f"{LABELS_CSV} row {i}"
        ip = index.path(s.image)
        try:
            img = read_image(ip)
        except Exception as e:  # PIL raises several types for bad files
            raise DatasetError(
                f"{ip} ({row}): cannot read image ({e}); re-export the file or remove its row"
            ) from None
        if s.mask is None:
            continue
        mp = index.path(s.mask)
        try:
            m = read_mask(mp)
        except Exception as e:
            raise DatasetError(
                f"{mp} ({row}): cannot read mask ({e}); masks are single-channel PNGs of class indices"
            ) from None
        if m.shape != img.shape[:2]:
            raise DatasetError(
                f"{mp} ({row}): mask is {m.shape[1]}x{m.shape[0]} but image '{s.image}' is "
                f"{img.shape[1]}x{img.shape[0]}; masks must have their image's size"
            )
        bad = np.setdiff1d(np.unique(m), np.arange(k + 1))
        if bad.size:
            raise DatasetError(
                f"{mp} ({row}): mask has value(s) {bad.tolist()}; allowed are 0 (background) to {k} (one per class)"
            )
    return index


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
