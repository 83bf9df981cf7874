"""The head geometry both synthetic head phantoms share (grey levels and Hounsfield units).

An elliptic brain outline that shrinks towards the vertex, slice positions, a drifting
texture, lateral ventricles, the falx and calcifications. The phantoms
(:class:`~camseg.data.synthetic_phantoms.HeadPhantom`, the preset's
:class:`~camseg.data.synthetic_hu_head.HuHead`) draw their own intensities on top. The
random draws happen in a fixed order, so a phantom's bytes do not change with this split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from camseg.data.synthetic_shapes import (
    Grid,
    Texture,
    blend_spot,
    ellipse_rho,
    slice_positions,
    smoothstep,
)


@dataclass(frozen=True)
class HeadGeometry:
    """One slice of the head frame.

    Attributes:
        t: the slice's position along the body axis.
        a: brain semi-axis along x at this slice; b: along y.
        rho: normalised brain-ellipse radius (1 on the inner table).
        dn: about the distance outside the brain (normalised units).
        tex: the slice's texture (unit variance).
        skull: skull thickness, modulated by the texture.
    """

    t: float
    a: float
    b: float
    rho: np.ndarray
    dn: np.ndarray
    tex: np.ndarray
    skull: np.ndarray


def draw_calcifications(
    rng: np.random.Generator,
    g: Grid,
    m: int,
    low: tuple[float, float],
    high: tuple[float, float],
    parenchymal: bool,
) -> list[tuple[float, ...]]:
    """Calcifications independent of the labels: choroid plexus pair, pineal, parenchymal.

    Each is (lx, ly in brain units, centre slice, half-extent in slices, radius px, level);
    radius and level are drawn between ``low`` and ``high``.
    """
    calcs: list[tuple[float, ...]] = []
    mid = (m - 1) / 2.0 + rng.normal(0.0, m / 8.0)

    def calc(lx: float, ly: float, zc: float, ext: float) -> tuple[float, ...]:
        r, level = rng.uniform(low, high)
        return (float(lx), float(ly), float(zc), float(ext), float(r) * g.k, float(level))

    if rng.random() < 0.6:  # choroid plexus pair
        lx, ly, ext = rng.uniform([0.2, 0.2, 1.0], [0.28, 0.35, 3.0])
        calcs += [calc(side * lx, ly, mid, ext) for side in (-1.0, 1.0)]
    if rng.random() < 0.5:  # pineal
        calcs.append(calc(0.0, rng.uniform(0.15, 0.3), mid + rng.normal(), rng.uniform(0, 2)))
    if parenchymal:
        for _ in range(int(rng.integers(0, 4))):
            r, phi = math.sqrt(rng.uniform()) * 0.75, rng.uniform(0, 2 * math.pi)
            zc, ext = rng.uniform(0, m - 1), rng.uniform(0, 2.5)
            calcs.append(calc(r * math.cos(phi), r * math.sin(phi), zc, ext))
    return calcs


class HeadFrame:
    """Brain ellipse, slices, texture, ventricles, falx and calcifications of one patient.

    Subclasses call ``super().__init__`` (the frame), draw their own skull and tissue
    values, then :meth:`_draw_interior`.
    """

    skull: float
    calcs: list[tuple[float, ...]]

    def __init__(self, rng: np.random.Generator, g: Grid) -> None:
        self.g = g
        cx, cy = (float(c) for c in rng.normal(0.0, 0.03, 2))
        self.x, self.y = g.local(cx, cy, float(rng.normal(0.0, 0.08)))
        self.a = float(rng.uniform(0.58, 0.68))
        self.b = min(0.8, self.a * float(rng.uniform(1.12, 1.25)))

    def _draw_interior(
        self,
        rng: np.random.Generator,
        m: int,
        falx_high: float,
        calc_low: tuple[float, float],
        calc_high: tuple[float, float],
        parenchymal_calcs: bool,
    ) -> None:
        self.t = slice_positions(rng, m)
        self.tex = Texture(rng, self.g.size, 3.0 * self.g.k, omega=0.35)
        # Ventricles: lateral offset, size factor, tilt.
        self.vent = [float(v) for v in rng.uniform([0.1, 0.8, 0.2], [0.15, 1.2, 0.45])]
        self.falx = float(rng.uniform(20, falx_high)) if rng.random() < 0.75 else 0.0
        self.calcs = draw_calcifications(rng, self.g, m, calc_low, calc_high, parenchymal_calcs)

    def scale(self, z: int) -> float:
        """The brain outline's size at slice z relative to its widest slice."""
        return math.sqrt(1.0 - (0.6 * self.t[z]) ** 2)

    def geometry(self, z: int) -> HeadGeometry:
        sc = self.scale(z)
        a, b, x, y = self.a * sc, self.b * sc, self.x, self.y
        rho = np.sqrt((x / a) ** 2 + (y / b) ** 2)
        dn = (rho - 1.0) * math.sqrt(a * b)
        tex = self.tex.at(z)
        skull = self.skull * (1.0 + 0.15 * tex)
        return HeadGeometry(float(self.t[z]), a, b, rho, dn, tex, skull)

    def ventricles(self, geo: HeadGeometry, like: np.ndarray) -> tuple[np.ndarray, float]:
        """(H,W) ventricle weight in [0,1] (zero where there are none) and their extent v."""
        spread, vsize, vang = self.vent
        a, b = geo.a, geo.b
        v = max(0.0, 1.0 - (geo.t / 0.6) ** 2)
        vent = np.zeros_like(like)
        if v > 0.05:
            va, vb = 0.07 * a * vsize * math.sqrt(v), 0.32 * b * vsize * v
            for side in (-1.0, 1.0):
                rv = ellipse_rho(self.x, self.y, side * spread * a, -0.05 * b, va, vb, side * vang)
                vent = np.maximum(vent, 1.0 - smoothstep(0.8, 1.0, rv))
        return vent, v

    def add_falx(self, img: np.ndarray, geo: HeadGeometry, v: float, width_px: float) -> None:
        """Interhemispheric falx, interrupted around the ventricles (corpus callosum)."""
        if self.falx > 0 and abs(geo.t) < 0.85:
            gap = v * (1.0 - smoothstep(0.25 * geo.b, 0.4 * geo.b, np.abs(self.y)))
            line = np.exp(-0.5 * (self.x / (width_px * self.g.px)) ** 2)
            img += self.falx * (line * (geo.rho < 0.93) * (1.0 - gap))

    def add_calcifications(self, img: np.ndarray, geo: HeadGeometry, z: int) -> None:
        x, y, px = self.x, self.y, self.g.px
        for lx, ly, zc, ext, r, level in self.calcs:
            if abs(z - zc) <= ext:
                blend_spot(img, ((x - lx * geo.a) ** 2 + (y - ly * geo.b) ** 2) / px**2, r, level)

    def blob_distance(
        self,
        z: int,
        s: float,
        centre: tuple[float, float, float],
        drift: np.ndarray,
        offs: np.ndarray,
        axes: np.ndarray,
        angs: np.ndarray,
    ) -> np.ndarray:
        """Elliptic distance to the nearest of a union of ellipses scaled by ``s``.

        ``centre`` is (lx, ly in brain units, centre slice zc); the union drifts by
        ``drift`` per slice away from zc.
        """
        lx, ly, zc = centre
        sc = self.scale(z)
        cx = lx * self.a * sc + drift[0] * (z - zc)
        cy = ly * self.b * sc + drift[1] * (z - zc)
        d = np.full(self.x.shape, np.inf, dtype=np.float32)
        for (ox, oy), (ax, ay), ang in zip(offs, axes, angs):
            rho = ellipse_rho(self.x, self.y, cx + ox * s, cy + oy * s, ax * s, ay * s, ang)
            d = np.minimum(d, rho)
        return d
