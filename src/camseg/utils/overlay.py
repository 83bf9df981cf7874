"""Pictures for people: CAM heatmaps over the image, mask contours, panels side by side."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps

# Contour colours: class k uses PALETTE[(k-1) % len]; ignore regions are outlined in grey.
PALETTE = np.array(
    [[0, 255, 0], [255, 0, 255], [0, 200, 255], [255, 200, 0], [255, 80, 80]], dtype=np.uint8
)
GT_COLOUR = np.array([255, 255, 0], dtype=np.uint8)
IGNORE_COLOUR = np.array([160, 160, 160], dtype=np.uint8)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 (H,W), (H,W,1), (H,W,3) or (H,W,C>3) -> (H,W,3) uint8 (extra channels: the middle one)."""
    if image.ndim == 2:
        image = image[..., None]
    c = image.shape[2]
    if c == 1:
        return np.repeat(image, 3, axis=2)
    if c == 3:
        return image
    return np.repeat(image[..., c // 2 : c // 2 + 1], 3, axis=2)


def heatmap(cam: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """(H,W) in [0,1] -> (H,W,3) uint8 colour map."""
    rgba = colormaps[colormap](np.clip(cam, 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def blend(image_rgb: np.ndarray, colour: np.ndarray, alpha: np.ndarray | float) -> np.ndarray:
    a = np.asarray(alpha, dtype=np.float32)
    if a.ndim == 2:
        a = a[..., None]
    out = image_rgb.astype(np.float32) * (1 - a) + colour.astype(np.float32) * a
    return out.round().clip(0, 255).astype(np.uint8)


def boundary(region: np.ndarray) -> np.ndarray:
    """Pixels of a boolean region that touch a pixel outside it (4-neighbourhood)."""
    r = region.astype(bool)
    inner = r.copy()
    inner[1:, :] &= r[:-1, :]
    inner[:-1, :] &= r[1:, :]
    inner[:, 1:] &= r[:, :-1]
    inner[:, :-1] &= r[:, 1:]
    return r & ~inner


def draw_contours(
    rgb: np.ndarray, mask: np.ndarray, colour: np.ndarray | None = None, ignore_index: int = 255
) -> np.ndarray:
    """Outline every class of ``mask`` (and its ignore region) on a copy of ``rgb``."""
    out = rgb.copy()
    if (mask == ignore_index).any():
        out[boundary(mask == ignore_index)] = IGNORE_COLOUR
    for k in np.unique(mask):
        if k in (0, ignore_index):
            continue
        out[boundary(mask == k)] = (
            colour if colour is not None else PALETTE[(int(k) - 1) % len(PALETTE)]
        )
    return out


def cam_overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The CAM heatmap over the image, weighted by the CAM so cold regions keep the anatomy visible."""
    rgb = to_rgb(image)
    return blend(rgb, heatmap(cam), alpha * (0.3 + 0.7 * np.clip(cam, 0, 1)))


def panel(*images: np.ndarray, gap: int = 4, titles: Sequence[str] | None = None) -> np.ndarray:
    """Images of equal height side by side with a black gap; ``titles`` (one per image)
    are written in a header strip above them."""
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"panel: {len(titles)} titles for {len(images)} images")
    h = max(im.shape[0] for im in images)
    parts = []
    for i, im in enumerate(images):
        im = to_rgb(im)
        if im.shape[0] != h:
            pad = np.zeros((h - im.shape[0], im.shape[1], 3), np.uint8)
            im = np.concatenate([im, pad], axis=0)
        parts.append(im)
        if i < len(images) - 1:
            parts.append(np.zeros((h, gap, 3), np.uint8))
    body = np.concatenate(parts, axis=1)
    if titles is None:
        return body
    widths = [to_rgb(im).shape[1] for im in images]
    return np.concatenate([header(titles, widths, gap), body], axis=0)


def stack(*rows: np.ndarray, gap: int = 4) -> np.ndarray:
    """Images (rows of a figure) one above the other with a black gap; narrower ones are
    padded on the right, so rows of differently sized images stack too."""
    width = max(r.shape[1] for r in rows)
    parts = []
    for i, r in enumerate(rows):
        r = to_rgb(r)
        if r.shape[1] != width:
            r = np.concatenate([r, np.zeros((r.shape[0], width - r.shape[1], 3), np.uint8)], axis=1)
        parts.append(r)
        if i < len(rows) - 1:
            parts.append(np.zeros((gap, width, 3), np.uint8))
    return np.concatenate(parts, axis=0)


def header(titles: Sequence[str], widths: Sequence[int], gap: int = 4) -> np.ndarray:
    """A black strip with each title centred over its column (columns ``gap`` apart).

    The font scales with the narrowest column; a long title is drawn smaller, and cut
    short (ending in "..") if even the smallest font does not fit. Each title is drawn
    in its own column, so no text reaches a neighbour or a gap.
    """
    import cv2

    font, thickness, smallest = cv2.FONT_HERSHEY_SIMPLEX, 1, 0.25
    base = float(np.clip(min(widths) / 320.0, 0.3, 1.0))

    def text_width(text: str, scale: float) -> int:
        return int(cv2.getTextSize(text, font, scale, thickness)[0][0])

    line = max(cv2.getTextSize("Ag", font, base, thickness)[0][1], 6)
    height = round(line * 2.2)
    columns = []
    for title, width in zip(titles, widths, strict=True):
        scale = base
        while scale > smallest and text_width(title, scale) > width - 4:
            scale = max(scale * 0.9, smallest)
        text = title
        while text and text_width(text, scale) > width - 4:
            text = text[:-3] + ".." if len(text) > 2 else ""
        column = np.zeros((height, width, 3), np.uint8)
        if text:
            (tw, th), _ = cv2.getTextSize(text, font, scale, thickness)
            org = (max((width - tw) // 2, 0), (height + th) // 2)
            cv2.putText(column, text, org, font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
        columns.append(column)
    return panel(*columns, gap=gap)


def pseudo_overlay(
    image: np.ndarray, cam: np.ndarray, mask: np.ndarray, gt: np.ndarray | None = None
) -> np.ndarray:
    """[image | CAM heatmap | pseudo-mask contours (+ ground truth in yellow)], titled."""
    rgb = to_rgb(image)
    right = draw_contours(rgb, mask)
    if gt is not None:
        right = draw_contours(right, gt, colour=GT_COLOUR)
    titles = ("image", "CAM", "pseudo-mask, truth" if gt is not None else "pseudo-mask")
    return panel(rgb, cam_overlay(image, cam), right, titles=titles)
