"""Cropping LIDC-IDRI slices to the lungs: one box per scan, optionally of a fixed size.

The box is found on the whole volume (:func:`lung_box`), so every slice of a scan is cut
the same way; :func:`crop` pads with air where a fixed-size box leaves the image.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from camseg.data.prepare.common import Issue


def lung_box(volume_hu: np.ndarray, margin: int) -> tuple[int, int, int, int] | None:
    """(row0, row1, col0, col1) half-open box around the lungs over all slices, or None.

    Lungs = air (< -400 HU) not connected, within a slice, to the image border (outside
    air, the scanner's padding), in 3D components of at least 0.1 % of a slice's area.
    """
    air = volume_hu < -400
    labels, n = ndimage.label(air, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return None
    border = np.unique(
        np.concatenate(
            [
                labels[:, 0, :].ravel(),
                labels[:, -1, :].ravel(),
                labels[:, :, 0].ravel(),
                labels[:, :, -1].ravel(),
            ]
        )
    )
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= 0.001 * volume_hu.shape[1] * volume_hu.shape[2]
    keep[border] = False
    keep[0] = False
    lungs = keep[labels].any(axis=0)
    if not lungs.any():
        return None
    rows, cols = np.flatnonzero(lungs.any(axis=1)), np.flatnonzero(lungs.any(axis=0))
    h, w = lungs.shape
    return (
        max(rows[0] - margin, 0),
        min(rows[-1] + 1 + margin, h),
        max(cols[0] - margin, 0),
        min(cols[-1] + 1 + margin, w),
    )


def fixed_box(box: tuple[int, int, int, int], size: int) -> tuple[int, int, int, int]:
    """A ``size`` x ``size`` box centred on ``box`` (may extend past the image: padded later)."""
    cr, cc = (box[0] + box[1]) // 2, (box[2] + box[3]) // 2
    return cr - size // 2, cr - size // 2 + size, cc - size // 2, cc - size // 2 + size


def crop(array: np.ndarray, box: tuple[int, int, int, int], fill: float) -> np.ndarray:
    """Crop the last two axes to ``box``, padding with ``fill`` where it leaves the array."""
    r0, r1, c0, c1 = box
    h, w = array.shape[-2:]
    out = np.full((*array.shape[:-2], r1 - r0, c1 - c0), fill, dtype=array.dtype)
    sr0, sr1, sc0, sc1 = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
    if sr1 > sr0 and sc1 > sc0:
        out[..., sr0 - r0 : sr1 - r0, sc0 - c0 : sc1 - c0] = array[..., sr0:sr1, sc0:sc1]
    return out


def scan_box(
    volume_hu: np.ndarray,
    mode: str,
    margin: int,
    size: int | None,
    scan_id: str,
    issues: list[Issue],
) -> tuple[int, int, int, int] | None:
    if mode == "none":
        return None
    box = lung_box(volume_hu, margin)
    if box is None:
        issues.append(
            Issue(
                "no_lungs_found", scan_id, None, "", "no lung region found; slices are not cropped"
            )
        )
        h, w = volume_hu.shape[1:]
        box = (0, h, 0, w)
        if size is None:
            return None
    return fixed_box(box, size) if size is not None else box
