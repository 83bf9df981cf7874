"""Geometry and texture helpers shared by the synthetic generators (:mod:`camseg.data.synthetic`,
:mod:`camseg.data.synthetic_presets`)."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


class Grid:
    """Pixel centres in normalised coordinates: u (columns) and v (rows) in [-1, 1]."""

    def __init__(self, size: int) -> None:
        c = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
        self.v, self.u = np.meshgrid(c, c, indexing="ij")
        self.size = size
        self.px = 2.0 / size  # one pixel in normalised units
        self.k = size / 128.0  # pixel-sized parameters are tuned at 128 px

    def local(self, cx: float, cy: float, theta: float) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates in a frame centred at (cx, cy) and rotated by ``theta``."""
        c, s = math.cos(theta), math.sin(theta)
        du, dv = self.u - cx, self.v - cy
        return c * du + s * dv, -s * du + c * dv

    def to_pixels(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised (u, v) -> (row, column) pixel coordinates."""
        return (v + 1.0) * self.size / 2.0 - 0.5, (u + 1.0) * self.size / 2.0 - 0.5


class Texture:
    """Smooth unit-variance noise that drifts coherently from slice to slice.

    Two independent fields mixed by cos/sin of the slice index keep unit variance at every
    slice for the cost of two filters per patient instead of one per slice.
    """

    def __init__(self, rng: np.random.Generator, size: int, sigma_px: float, omega: float) -> None:
        self.fields = [smooth_noise(rng, size, sigma_px) for _ in range(2)]
        self.omega, self.phase = omega, float(rng.uniform(0.0, 2.0 * math.pi))

    def at(self, z: int) -> np.ndarray:
        a = self.omega * z + self.phase
        return math.cos(a) * self.fields[0] + math.sin(a) * self.fields[1]


def smooth_noise(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), sigma_px)
    return n / max(float(n.std()), 1e-6)


def smoothstep(lo: float, hi: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def ellipse_rho(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, theta: float = 0.0
) -> np.ndarray:
    """Normalised elliptic radius (1 on the ellipse) in an already local frame."""
    c, s = math.cos(theta), math.sin(theta)
    dx, dy = x - cx, y - cy
    return np.sqrt(((c * dx + s * dy) / a) ** 2 + ((-s * dx + c * dy) / b) ** 2)


def blend_spot(img: np.ndarray, d2: np.ndarray, r: float, level: float) -> None:
    """Blend a bright spot with a flat top (d2: squared distance in pixels) into ``img``."""
    w = np.minimum(1.0, 1.4 * np.exp(-0.5 * d2 / (r * r)))
    img += w * (level - img)


def splat(size: int, rows: np.ndarray, cols: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Bilinear splat of weighted points onto a zero image."""
    out = np.zeros((size + 1, size + 1), dtype=np.float32)
    r0, c0 = np.floor(rows).astype(np.int64), np.floor(cols).astype(np.int64)
    keep = (r0 >= 0) & (c0 >= 0) & (r0 < size - 1) & (c0 < size - 1)
    r0, c0, fr, fc, w = r0[keep], c0[keep], (rows - r0)[keep], (cols - c0)[keep], weights[keep]
    for dr, dc, f in (
        (0, 0, (1 - fr) * (1 - fc)),
        (0, 1, (1 - fr) * fc),
        (1, 0, fr * (1 - fc)),
        (1, 1, fr * fc),
    ):
        np.add.at(out, (r0 + dr, c0 + dc), w * f)
    return out[:size, :size]


def slice_positions(rng: np.random.Generator, m: int) -> np.ndarray:
    """Position of each slice along the body axis, within about -0.95 (top) to 0.95 (bottom).

    Long volumes cover most of the organ; short ones a shorter stretch of it, so neighbouring
    slices stay alike whatever the slice count.
    """
    span = min(1.7, 0.15 * (m - 1))
    start = rng.uniform(-0.95, 0.95 - span)
    return np.linspace(start, start + span, m)


def run_profile(z: int, z0: int, z1: int) -> float:
    """Size factor of a lesion spanning slices z0..z1: 1 in the middle, rounded to ~0.45 at its ends."""
    zc, half = (z0 + z1) / 2.0, (z1 - z0) / 2.0 + 0.75
    return 0.45 + 0.55 * math.sqrt(max(0.0, 1.0 - ((z - zc) / half) ** 2))


def add_scanner_noise(img: np.ndarray, rng: np.random.Generator, amplitude: float) -> None:
    """Add slightly smooth noise of standard deviation ``amplitude`` to the square ``img``."""
    size = img.shape[0]
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), 0.6)
    img += amplitude * noise / max(float(noise.std()), 1e-6)
