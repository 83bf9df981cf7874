"""Images above ``data.max_image_pixels``: a bounded working size and a one-time warning.

Per-pixel float maps (CAMs, logits, heatmaps) of an 8000x8000 image cost 256 MB each in
float32, several of them at once; above the limit they are computed at a working size
of at most ``max_image_pixels`` pixels, and only uint8 masks are resized to the image's
own size (nearest neighbour), so memory stays bounded whatever the image size.
"""

from __future__ import annotations

import logging
import math

import numpy as np

DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
# Overlays are pictures for people: a 2048x2048 panel shows what there is to see, and its
# float heatmap and blend stay near 100 MB whatever the image size.
OVERLAY_MAX_PIXELS = 2048 * 2048

log = logging.getLogger("camseg")
_warned: set[str] = set()


def working_size(height: int, width: int, max_pixels: int | None) -> tuple[int, int]:
    """(height, width) scaled down, aspect kept, to at most ``max_pixels`` pixels (None/0: no limit)."""
    if not max_pixels or max_pixels <= 0 or height * width <= max_pixels:
        return height, width
    s = math.sqrt(max_pixels / (height * width))
    return max(1, int(height * s)), max(1, int(width * s))


def warn_large(
    where: str, name: str, height: int, width: int, max_pixels: int | None, setting: str
) -> None:
    """Log once per ``where`` (a stage or command) that an image is above the limit (if it is)."""
    if where in _warned or working_size(height, width, max_pixels) == (height, width):
        return
    _warned.add(where)
    h, w = working_size(height, width, max_pixels)
    log.warning(
        "%s: image %s is %dx%d (%.1f Mpx), above %s=%d: its float maps are computed at %dx%d "
        "and its mask is resized to %dx%d (later large images are not reported again); "
        "raise %s to work at full size with more memory",
        where,
        name,
        width,
        height,
        height * width / 1e6,
        setting,
        max_pixels,
        w,
        h,
        width,
        height,
        setting,
    )


def resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A uint8 class-index mask (H,W) resized to (height, width) without new values."""
    if mask.shape[:2] == (height, width):
        return mask
    import cv2  # here, not at the top: camseg-predict --help must not pay for it

    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)


def resize_area(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """A uint8 image (H,W[,C]) shrunk for display or CRF; channels kept."""
    if image.shape[:2] == (height, width):
        return image
    import cv2

    out = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    return out[..., None] if image.ndim == 3 and out.ndim == 2 else out
