"""The camseg dataset folder format: ``labels.csv`` beside image and mask files.

``labels.csv`` columns: ``image`` (required, path relative to the root), optional
``mask`` (single-channel PNG of class indices, 0 = background, k = class k),
optional ``group`` (patient id: splits never cut a group), optional ``split``
(``train``/``val``/``test``), optional ``slice`` (index inside the patient's volume),
and one 0/1 column per class. A row whose class columns are all 0 is a negative image.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from camseg.constants import IGNORE_INDEX
from camseg.data.labels_csv import (
    LABELS_CSV,
    PROBLEM_CAP,
    Problems,
    Sample,
    check_csv_file,
    check_header,
    check_split_groups,
    parse_rows,
    read_csv,
)
from camseg.data.labels_csv import sample_id as sample_id  # re-export
from camseg.errors import DatasetProblems as DatasetProblems  # re-export
from camseg.utils.io import read_image, read_mask


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
    csv_path, real_root = check_csv_file(root, check_files)
    header, rows, lines = read_csv(csv_path)
    classes, extra = check_header(csv_path, header, rows, classes)
    samples, row_numbers = parse_rows(
        csv_path, real_root, rows, lines, classes, check_files, problems
    )
    # With rows left out, "no positive row" could be a consequence, not a problem of its own.
    if require_positive and not problems.total:
        counts = np.array([s.labels for s in samples]).sum(axis=0)
        for c, n in zip(classes, counts, strict=True):
            if n == 0:
                problems.add(
                    f"{csv_path}: class '{c}' has no positive row; drop the column or add images that show it"
                )
    check_split_groups(csv_path, samples, problems)
    index = DatasetIndex(root=root, classes=list(classes), samples=samples, extra_columns=extra)
    return index, row_numbers


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
