"""Shared fixtures: tiny datasets in the camseg folder format, written with numpy + PIL.

The datasets are built here rather than with ``camseg.data.synthetic`` so that tests of
the reader, the splits and the DataModule control every pixel and every CSV cell and
compute their expectations independently of the code under test.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@dataclass
class Record:
    """One sample to write: pixels, optional mask and the CSV cells.

    Attributes:
        name: file stem; the image goes to ``images/<name>.png``, the mask to ``masks/<name>.png``.
        image: uint8 (H,W) or (H,W,3).
        labels: class name -> 0/1.
        mask: uint8 (H,W) class indices, or None.
        group, split, slice: the optional reserved columns ('' / None leaves the cell empty).
    """

    name: str
    image: np.ndarray
    labels: dict[str, int]
    mask: np.ndarray | None = None
    group: str = ""
    split: str = ""
    slice: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


def write_dataset(
    root: Path,
    records: Sequence[Record],
    classes: Sequence[str],
    columns: Sequence[str] = ("image", "mask", "group", "split", "slice"),
) -> Path:
    """Write ``records`` as a dataset root (``labels.csv``, ``images/``, ``masks/``); return ``root``.

    ``columns`` chooses which reserved columns the CSV has (``image`` always first);
    class columns follow in ``classes`` order.
    """
    (root / "images").mkdir(parents=True, exist_ok=True)
    extra_cols = sorted({k for r in records for k in r.extra})
    header = [*columns, *classes, *extra_cols]
    rows = []
    for r in records:
        image_rel = f"images/{r.name}.png"
        Image.fromarray(r.image).save(root / image_rel)
        mask_rel = ""
        if r.mask is not None:
            (root / "masks").mkdir(exist_ok=True)
            mask_rel = f"masks/{r.name}.png"
            Image.fromarray(r.mask.astype(np.uint8), mode="L").save(root / mask_rel)
        cells = {
            "image": image_rel,
            "mask": mask_rel,
            "group": r.group,
            "split": r.split,
            "slice": "" if r.slice is None else str(r.slice),
            **{c: str(r.labels[c]) for c in classes},
            **r.extra,
        }
        rows.append([cells.get(h, "") for h in header])
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return root


def read_csv_rows(root: Path) -> list[dict[str, str]]:
    with open(root / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def write_csv_rows(
    root: Path, rows: list[dict[str, str]], header: Sequence[str] | None = None
) -> None:
    header = list(header or rows[0].keys())
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def disc_sample(
    size: int, rng: np.random.Generator, positive: bool
) -> tuple[np.ndarray, np.ndarray]:
    """A dark noisy image; a positive one gets a bright disc, and the mask marks exactly that disc."""
    image = rng.integers(20, 60, size=(size, size), dtype=np.uint8)
    mask = np.zeros((size, size), dtype=np.uint8)
    if positive:
        cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
        r = max(3, size // 8)
        yy, xx = np.mgrid[:size, :size]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        mask[disc] = 1
        image[disc] = 220
    return image, mask


def tiny_records(
    patients: int = 6, slices: int = 4, size: int = 48, seed: int = 0, cls: str = "lesion"
) -> list[Record]:
    """``patients`` x ``slices`` grey images with one class; every patient has a positive and a negative slice."""
    rng = np.random.default_rng(seed)
    out = []
    for p in range(patients):
        for s in range(slices):
            positive = (s + p) % 2 == 0
            image, mask = disc_sample(size, rng, positive)
            out.append(
                Record(
                    f"P{p:02d}_{s:02d}",
                    image,
                    {cls: int(positive)},
                    mask,
                    group=f"P{p:02d}",
                    slice=s,
                )
            )
    return out


class DatasetKit:
    """The helpers above, handed to tests through the ``kit`` fixture (conftest is not imported)."""

    Record = Record
    write = staticmethod(write_dataset)
    read_rows = staticmethod(read_csv_rows)
    write_rows = staticmethod(write_csv_rows)
    disc_sample = staticmethod(disc_sample)
    tiny_records = staticmethod(tiny_records)


@pytest.fixture
def kit() -> DatasetKit:
    return DatasetKit()


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """A dataset root: 6 patients x 4 slices, 48 px grey PNGs, masks, one class ``lesion``."""
    return write_dataset(tmp_path / "tiny", tiny_records(), ["lesion"])
