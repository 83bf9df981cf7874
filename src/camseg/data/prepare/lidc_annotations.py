"""LIDC-IDRI scans and reader annotations as plain data: clustering into nodules, consensus masks.

These re-implement, on plain arrays, what ``pylidc.Scan.cluster_annotations`` and
``pylidc.utils.consensus`` compute. pylidc 0.2.3 (the current release) calls
``np.int``, which NumPy >= 1.24 removed, inside both functions, so camseg reads only the
annotation *data* from pylidc's database and does the geometry here, with the same rules:

* an annotation is a list of contours; a contour is a closed polygon of (row, column)
  pixel indices on the slice at its ``z``; inclusion contours add their inside, exclusion
  contours remove it, and the contour vertices themselves are left out (pylidc's
  ``boolean_mask(include_contour_points=False)``);
* annotations belong to one nodule when the smallest distance between their contour points
  in (row, column, slice-index) units is <= ``tol`` (default: the scan's slice thickness),
  with ``tol`` shrunk by 0.9 while a cluster holds more than four annotations;
* the consensus mask keeps voxels covered by at least ``clevel`` of a nodule's annotations.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from matplotlib.path import Path as PolygonPath
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import cdist


@dataclass(frozen=True)
class Contour:
    """One reader's outline on one slice.

    Attributes:
        z: ImagePositionPatient z (mm) of the slice it was drawn on.
        points: (N,2) int (row, column) pixel indices of the polygon's vertices.
        inclusion: True if its inside is nodule, False if it cuts a hole.
    """

    z: float
    points: np.ndarray
    inclusion: bool = True


@dataclass(frozen=True)
class ReaderAnnotation:
    """One reader's outline of one nodule: its contours over several slices."""

    contours: tuple[Contour, ...]
    reader: str = ""


@dataclass(frozen=True)
class LidcScanRecord:
    """What a source knows about one CT scan before its pixels are read.

    Attributes:
        scan_id: unique, file-name safe id (patient id, plus a suffix for a patient's 2nd scan).
        patient_id: the group (``LIDC-IDRI-0001``).
        dicom_dir: folder holding the series' DICOM files, or None when it was not found.
        series_uid: SeriesInstanceUID to pick from that folder (None: every image in it).
        annotations: every reader's nodule outlines on this scan.
        cluster_tol: clustering distance (pylidc: the scan's slice thickness); None: median z spacing.
        expected_z: slice z positions the annotation database knows, to cross-check the files.
    """

    scan_id: str
    patient_id: str
    dicom_dir: Path | None
    series_uid: str | None
    annotations: tuple[ReaderAnnotation, ...]
    cluster_tol: float | None = None
    expected_z: np.ndarray | None = field(default=None, compare=False)


class LidcSource(Protocol):
    """Anything that lists LIDC scans with their annotations (pylidc, or a test fake)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[LidcScanRecord]: ...


def slice_index(z_positions: np.ndarray, z: float) -> tuple[int, float]:
    """Index of the slice nearest ``z`` (pylidc's ``image_k_position``) and its distance in mm."""
    k = int(np.abs(z_positions - z).argmin())
    return k, float(abs(z_positions[k] - z))


def _points_ijk(ann: ReaderAnnotation, z_positions: np.ndarray) -> np.ndarray:
    parts = [
        np.c_[
            np.asarray(c.points, dtype=np.float64),
            np.full(len(c.points), slice_index(z_positions, c.z)[0]),
        ]
        for c in ann.contours
    ]
    return np.vstack(parts) if parts else np.zeros((0, 3))


def cluster_annotations(
    annotations: list[ReaderAnnotation],
    z_positions: np.ndarray,
    tol: float,
    factor: float = 0.9,
    min_tol: float = 0.1,
) -> list[list[int]]:
    """Group annotations that outline the same nodule; returns lists of annotation indices.

    Same rule as ``pylidc.Scan.cluster_annotations(metric='min')``: connected components of
    "min contour-point distance <= tol", shrinking ``tol`` while a group has > 4 members
    (LIDC had four readers). Groups are ordered by their first member.
    """
    n = len(annotations)
    if n == 0:
        return []
    points = [_points_ijk(a, z_positions) for a in annotations]
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            if len(points[i]) and len(points[j]):
                dist[i, j] = dist[j, i] = cdist(points[i], points[j]).min()
            else:
                dist[i, j] = dist[j, i] = np.inf
    _, ids = connected_components(dist <= tol, directed=False)
    while np.bincount(ids).max() > 4:
        tol *= factor
        if tol < min_tol:
            break  # pylidc gives up here too and keeps the last grouping
        _, ids = connected_components(dist <= tol, directed=False)
    groups: dict[int, list[int]] = {}
    for i, cid in enumerate(ids):
        groups.setdefault(int(cid), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def _polygon_inside(
    points: np.ndarray, shape: tuple[int, int]
) -> tuple[np.ndarray, tuple[int, int]]:
    """Pixels of the polygon's bounding box inside the closed polygon; (mask, (row0, col0))."""
    pts = np.asarray(points, dtype=np.int64)
    if len(pts) and (pts[0] != pts[-1]).any():
        pts = np.vstack([pts, pts[:1]])
    r0, c0 = np.maximum(pts.min(axis=0), 0)
    r1, c1 = np.minimum(pts.max(axis=0), np.array(shape) - 1)
    if r1 < r0 or c1 < c0:
        return np.zeros((0, 0), dtype=bool), (int(r0), int(c0))
    rr, cc = np.mgrid[r0 : r1 + 1, c0 : c1 + 1]
    inside = PolygonPath(pts, closed=True).contains_points(np.c_[rr.ravel(), cc.ravel()])
    return inside.reshape(rr.shape), (int(r0), int(c0))


def annotation_mask(
    ann: ReaderAnnotation, z_positions: np.ndarray, shape: tuple[int, int]
) -> dict[int, np.ndarray]:
    """Rasterise one annotation: ``{slice index: (H,W) bool}`` for the slices it touches."""
    masks: dict[int, np.ndarray] = {}
    ordered = [c for c in ann.contours if c.inclusion] + [
        c for c in ann.contours if not c.inclusion
    ]
    for c in ordered:
        k = slice_index(z_positions, c.z)[0]
        m = masks.setdefault(k, np.zeros(shape, dtype=bool))
        inside, (r0, c0) = _polygon_inside(c.points, shape)
        window = m[r0 : r0 + inside.shape[0], c0 : c0 + inside.shape[1]]
        if c.inclusion:
            window |= inside
        else:
            window &= ~inside
        pts = np.asarray(c.points, dtype=np.int64)
        ok = (pts[:, 0] >= 0) & (pts[:, 0] < shape[0]) & (pts[:, 1] >= 0) & (pts[:, 1] < shape[1])
        m[pts[ok, 0], pts[ok, 1]] = False
    return masks


def consensus_mask(
    annotations: list[ReaderAnnotation],
    z_positions: np.ndarray,
    shape: tuple[int, int],
    clevel: float,
) -> dict[int, np.ndarray]:
    """Voxels inside at least ``clevel`` (fraction) of the annotations: ``{slice: (H,W) bool}``.

    Slices where the result is empty are left out.
    """
    counts: dict[int, np.ndarray] = {}
    for ann in annotations:
        for k, m in annotation_mask(ann, z_positions, shape).items():
            counts.setdefault(k, np.zeros(shape, dtype=np.int32))
            counts[k] += m
    n = len(annotations)
    out = {k: (c / n) >= clevel for k, c in counts.items()}
    return {k: m for k, m in out.items() if m.any()}
