"""The phantoms of the synthetic dataset: head and chest slices, and their lesion objects.

A phantom is drawn once per patient from its anatomy stream and renders any slice ``z`` as
grey levels (:class:`PhantomSlice`); ``lesion`` draws one lesion object from the lesion
stream. :func:`~camseg.data.synthetic_render.render_volume` puts slices and lesions together.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from camseg.data.synthetic_head import HeadFrame
from camseg.data.synthetic_shapes import (
    Grid,
    Texture,
    ellipse_rho,
    run_profile,
    slice_positions,
    smoothstep,
    splat,
)

AIR = 3.0


@dataclass
class PhantomSlice:
    """One rendered slice of anatomy, handed to the lesion shapes."""

    image: np.ndarray  # (H,W) float32 grey levels
    allowed: np.ndarray  # (H,W) bool: where lesions of this flavor may lie
    tissue: float  # grey level of the tissue the lesions sit in
    rho: np.ndarray | None = None  # head: normalised brain-ellipse radius
    angle: np.ndarray | None = None  # head: angle in the brain-ellipse frame


Shape = Callable[[int, float, PhantomSlice], np.ndarray]


@dataclass
class Lesion:
    """One lesion object spanning slices ``z0..z1``.

    ``shape(z, s, slice)`` returns its (H,W) bool mask at slice ``z`` for size factor ``s``
    (the run profile times any growth needed to reach the minimum area).
    """

    z0: int
    z1: int
    shape: Shape
    delta: float  # grey levels above the tissue
    hetero: float  # amplitude of the internal texture
    edge_px: float  # edge softness (gaussian sigma of the blend, pixels)

    def profile(self, z: int) -> float:
        """Radius factor: largest in the middle of the run, rounded towards its ends."""
        return run_profile(z, self.z0, self.z1)


class HeadPhantom(HeadFrame):
    """Axial head slices: scalp, skull, brain, sulcal CSF, ventricles, falx, calcifications."""

    def __init__(self, rng: np.random.Generator, g: Grid, m: int) -> None:
        super().__init__(rng, g)
        self.skull, self.scalp = float(rng.uniform(0.04, 0.065)), float(rng.uniform(0.015, 0.03))
        self.brain, self.cortex = float(rng.uniform(96, 108)), float(rng.uniform(4, 9))
        self.csf, self.bone = float(rng.uniform(38, 55)), float(rng.uniform(228, 246))
        self.scalp_level = float(rng.uniform(78, 95))
        self._draw_interior(rng, m, 55, (1.0, 185.0), (2.0, 240.0), parenchymal_calcs=True)

    def render(self, z: int) -> PhantomSlice:
        geo = self.geometry(z)
        rho, dn, tex, skull = geo.rho, geo.dn, geo.tex, geo.skull
        img = np.full(rho.shape, AIR, dtype=np.float32)
        img = np.where(dn < skull + self.scalp, self.scalp_level + 2.0 * tex, img)
        img = np.where(dn < skull, self.bone + 6.0 * tex, img)
        brain = self.brain + self.cortex * smoothstep(0.84, 0.95, rho) + 3.5 * tex
        brain += (self.csf - brain) * 0.55 * smoothstep(0.965, 0.995, rho)  # sulcal CSF rim
        inside = rho < 1.0
        img = np.where(inside, brain, img).astype(np.float32)
        vent, v = self.ventricles(geo, img)
        if v > 0.05:
            img += vent * (self.csf + 2.0 * tex - img)
        self.add_falx(img, geo, v, 0.7)
        self.add_calcifications(img, geo, z)
        angle = np.arctan2(self.y / geo.b, self.x / geo.a)
        return PhantomSlice(img, inside, self.brain, rho=rho, angle=angle)

    def lesion(self, rng: np.random.Generator, z0: int, z1: int, edge: Texture) -> Lesion:
        delta, hetero = float(rng.uniform(45, 80)), float(rng.uniform(2, 5))
        shape = (
            self._blob_shape(rng, z0, z1, edge)
            if rng.random() < 0.65
            else self._crescent_shape(rng, edge)
        )
        return Lesion(z0, z1, shape, delta, hetero, 0.5)

    def _blob_shape(self, rng: np.random.Generator, z0: int, z1: int, edge: Texture) -> Shape:
        """Intraparenchymal: a union of 1-3 ellipses with a noisy boundary."""
        r0, phi = math.sqrt(rng.uniform()) * 0.68, rng.uniform(0, 2 * math.pi)
        centre = (r0 * math.cos(phi), r0 * math.sin(phi), (z0 + z1) / 2.0)
        drift = rng.normal(0.0, 0.012, 2)
        size = float(rng.uniform(0.065, 0.16))
        k = int(rng.integers(1, 4))
        offs = rng.normal(0.0, 0.45, (k, 2)) * size
        offs[0] = 0.0
        axes, angs = size * rng.uniform(0.55, 1.0, (k, 2)), rng.uniform(0, math.pi, k)
        bamp = float(rng.uniform(0.1, 0.3))

        def shape(z: int, s: float, sl: PhantomSlice) -> np.ndarray:
            d = self.blob_distance(z, s, centre, drift, offs, axes, angs)
            return d + bamp * edge.at(z) < 1.0

        return shape

    def _crescent_shape(self, rng: np.random.Generator, edge: Texture) -> Shape:
        """Subdural-like: a crescent along the inner table, thickest in its middle."""
        theta0, width = rng.uniform(-math.pi, math.pi), float(rng.uniform(0.4, 0.9))
        thick, bamp = float(rng.uniform(0.1, 0.22)), float(rng.uniform(0.05, 0.2))

        def shape(z: int, s: float, sl: PhantomSlice) -> np.ndarray:
            assert sl.rho is not None and sl.angle is not None
            dth = np.angle(np.exp(1j * (sl.angle - theta0)))
            prof = np.sqrt(np.clip(1.0 - (dth / width) ** 2, 0.0, 1.0))
            t = thick * s * prof * (1.0 + bamp * edge.at(z))
            return (sl.rho < 1.0) & (sl.rho > 1.0 - t)

        return shape


class ChestPhantom:
    """Axial chest slices: fat, soft tissue, lungs with vessels, heart, spine, ribs, sternum."""

    def __init__(self, rng: np.random.Generator, g: Grid, m: int) -> None:
        self.g, self.m = g, m
        self.cx, self.cy = float(rng.normal(0.0, 0.02)), float(rng.normal(0.03, 0.02))
        self.theta = float(rng.normal(0.0, 0.03))
        self.x, self.y = g.local(self.cx, self.cy, self.theta)
        self.A = float(rng.uniform(0.8, 0.9))
        self.B = self.A * float(rng.uniform(0.62, 0.72))
        self.fat_t = float(rng.uniform(0.05, 0.1))
        self.soft, self.fat = float(rng.uniform(125, 140)), float(rng.uniform(88, 102))
        self.lung, self.bone = float(rng.uniform(22, 34)), float(rng.uniform(225, 245))
        self.t = slice_positions(rng, m)
        self.tex = Texture(rng, g.size, 2.5 * g.k, omega=0.35)
        # Lungs: centre (x, y), semi-axes (x, y), tilt; in body units.
        self.lungs = [
            [
                float(v)
                for v in rng.uniform([0.4, -0.08, 0.29, 0.62, 0.03], [0.44, 0, 0.33, 0.72, 0.12])
            ]
            for _ in range(2)
        ]
        for side, lung in zip((-1.0, 1.0), self.lungs):
            lung[0], lung[4] = side * lung[0], side * lung[4]
        self.heart = tuple(
            float(v) for v in rng.uniform([0.04, -0.25, 0.2, 0.3], [0.1, -0.1, 0.25, 0.4])
        )
        n_ribs = 10
        self.ribs = np.linspace(-0.3 * math.pi, 1.3 * math.pi, n_ribs) + rng.normal(0, 0.05, n_ribs)
        self.vessels = [self._sample_vessels(rng, side) for side in (-1.0, 1.0)]

    def _sample_vessels(self, rng: np.random.Generator, side: float) -> dict[str, np.ndarray]:
        """Vessels in lung units (unit disc): dots that move between slices, and short lines."""
        n = int(rng.integers(18, 32))
        r, phi = np.sqrt(rng.uniform(0, 1, n)) * 0.95, rng.uniform(0, 2 * math.pi, n)
        p0 = np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1)
        hilum = np.array([-side * 0.55, 0.0])
        # Hilar vessels are thicker; the sigma is snapped to a few values (one filter each).
        near = np.exp(-np.linalg.norm(p0 - hilum, axis=1))
        sigma = np.round((0.5 + 0.6 * near * rng.uniform(0.5, 1.0, n)) * 4) / 4
        nl = int(rng.integers(3, 7))
        ang = rng.uniform(-0.9, 0.9, nl) + (0.0 if side < 0 else math.pi)  # away from the hilum
        return {
            "p0": p0,
            "vel": rng.normal(0.0, 0.05, (n, 2)),
            "zc": rng.uniform(0, self.m - 1, n),
            "sigma": sigma,
            "peak": rng.uniform(40, 95, n),
            "l_start": hilum + rng.normal(0, 0.1, (nl, 2)),
            "l_ang": ang,
            "l_len": rng.uniform(0.3, 0.7, nl),
            "l_zc": rng.uniform(0, self.m - 1, nl),
            "l_ext": rng.uniform(0, 2, nl),
            "l_peak": rng.uniform(45, 90, nl),
        }

    def _lung_scale(self, z: int) -> float:
        return 0.7 + 0.3 * float(np.clip(1.0 - ((self.t[z] - 0.25) / 1.25) ** 2, 0.0, 1.0))

    def _lung_to_image(self, lung: int, z: int, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lung units (unit disc, (N,2)) -> normalised image (u, v)."""
        lcx, lcy, la, lb, tilt = self.lungs[lung]
        ls = self._lung_scale(z)
        px, py = p[:, 0] * la * self.A * ls, p[:, 1] * lb * self.B * ls
        c, s = math.cos(tilt), math.sin(tilt)
        x, y = lcx * self.A + c * px - s * py, lcy * self.B + s * px + c * py
        c, s = math.cos(self.theta), math.sin(self.theta)
        return self.cx + c * x - s * y, self.cy + s * x + c * y

    def _vessel_image(self, z: int) -> np.ndarray:
        g = self.g
        parts: list[tuple[np.ndarray, ...]] = []  # (rows, cols, sigma, weight) of splatted points
        for lung, ves in enumerate(self.vessels):
            p = ves["p0"] + ves["vel"] * (z - ves["zc"])[:, None]
            vis = np.linalg.norm(p, axis=1) < 0.97
            u, v = self._lung_to_image(lung, z, p[vis])
            s = ves["sigma"][vis] * g.k
            r, c = g.to_pixels(u, v)
            parts.append((r, c, ves["sigma"][vis], ves["peak"][vis] * 2 * math.pi * s * s))
            on = np.abs(z - ves["l_zc"]) <= ves["l_ext"]
            step = 0.5 * g.px / (0.3 * self.A)  # about half a pixel along the line, in lung units
            for start, ang, length, peak in zip(
                ves["l_start"][on], ves["l_ang"][on], ves["l_len"][on], ves["l_peak"][on]
            ):
                tt = np.arange(0.0, length, step)
                pts = start + tt[:, None] * np.array([math.cos(ang), math.sin(ang)])
                pts = pts[np.linalg.norm(pts, axis=1) < 0.97]
                u, v = self._lung_to_image(lung, z, pts)
                r, c = g.to_pixels(u, v)
                s = 0.7 * g.k
                line_w = peak * math.sqrt(2 * math.pi) * s * 0.5  # points 0.5 px apart
                parts.append((r, c, np.full(len(r), 0.7), np.full(len(r), line_w)))
        rows_a, cols_a, sig_a, w_a = (np.concatenate(x) for x in zip(*parts))
        out = np.zeros((g.size, g.size), dtype=np.float32)
        for s in np.unique(sig_a):
            sel = sig_a == s
            out += ndimage.gaussian_filter(
                splat(g.size, rows_a[sel], cols_a[sel], w_a[sel]), s * g.k
            )
        return out

    def render(self, z: int) -> PhantomSlice:
        g, t = self.g, float(self.t[z])
        x, y, A, B = self.x, self.y, self.A, self.B
        bs = 1.0 - 0.08 * t * t
        tex = self.tex.at(z)
        rho = np.sqrt((x / (A * bs)) ** 2 + (y / (B * bs)) ** 2) + 0.01 * tex
        img = np.full(rho.shape, AIR, dtype=np.float32)
        img = np.where(rho < 1.0, self.fat + 3.0 * tex, img)
        img = np.where(rho < 1.0 - self.fat_t, self.soft + 4.0 * tex, img).astype(np.float32)
        # Ribs just inside the fat, then spine and sternum: bone that is never a lesion.
        rib_r = 0.92 - self.fat_t
        for phi in self.ribs + 0.02 * z:
            rx, ry = rib_r * A * bs * math.cos(phi), rib_r * B * bs * math.sin(phi)
            rr = ellipse_rho(x, y, rx, ry, 0.035 * A, 0.02 * A, phi + math.pi / 2)
            img += (rr < 1.0) * (self.bone - 25.0 - img)
        spine_y = 0.66 * B * bs
        d_spine = ellipse_rho(x, y, 0.0, spine_y, 0.11 * B, 0.1 * B)
        img = np.where(d_spine < 1.0, self.bone - 50.0 + 5.0 * tex, img)
        img = np.where((d_spine < 1.0) & (d_spine > 0.75), self.bone, img)
        canal = ellipse_rho(x, y, 0.0, spine_y + 0.17 * B, 0.05 * B, 0.05 * B)
        img = np.where(canal < 1.0, 70.0, img)
        if t > -0.6:
            stern = ellipse_rho(x, y, 0.0, -(0.9 - self.fat_t) * B * bs, 0.07 * A, 0.035 * A)
            img = np.where(stern < 1.0, self.bone - 35.0, img)
        aorta = ellipse_rho(x, y, 0.14 * A, 0.45 * B, 0.065 * A, 0.065 * A)
        img = np.where(aorta < 1.0, self.soft + 8.0, img)
        ls = self._lung_scale(z)
        lungs = np.zeros(rho.shape, dtype=bool)
        for lcx, lcy, la, lb, tilt in self.lungs:
            rl = ellipse_rho(x, y, lcx * A, lcy * B, la * A * ls, lb * B * ls, tilt)
            lungs |= rl + 0.03 * tex < 1.0
        h = float(np.clip(t / 0.6, 0.0, 1.0))
        if h > 0:
            hx, hy, ha, hb = self.heart
            hs = 0.5 + 0.5 * h
            rh = ellipse_rho(x, y, hx * A, hy * B, ha * A * hs, hb * B * hs)
            lungs &= rh > 1.08
            img = np.where(rh < 1.0, self.soft + 6.0 + 2.0 * tex, img)
        img = np.where(lungs, self.lung + 3.0 * tex, img).astype(np.float32)
        soft_lungs = ndimage.gaussian_filter(lungs.astype(np.float32), 0.7 * g.k)
        img += self._vessel_image(z) * soft_lungs
        return PhantomSlice(img, lungs, self.lung)

    def lesion(self, rng: np.random.Generator, z0: int, z1: int, edge: Texture) -> Lesion:
        """A round-ish, slightly lobulated nodule inside one lung; solid or ground-glass."""
        lung = int(rng.integers(0, 2))
        r0, phi = math.sqrt(rng.uniform()) * 0.6, rng.uniform(0, 2 * math.pi)
        p0 = np.array([r0 * math.cos(phi), r0 * math.sin(phi)])
        drift, zc = rng.normal(0.0, 0.03, 2), (z0 + z1) / 2.0
        radius = float(rng.uniform(0.06, 0.14))
        lob, ph = rng.uniform(0.0, 0.15, 2), rng.uniform(0, 2 * math.pi, 2)
        bamp = float(rng.uniform(0.0, 0.08))
        solid = rng.random() < 0.85
        delta = float(rng.uniform(85, 140) if solid else rng.uniform(40, 65))
        g = self.g

        def shape(z: int, s: float, sl: PhantomSlice) -> np.ndarray:
            p = p0 + drift * (z - zc)
            p = p * min(1.0, 0.85 / max(float(np.linalg.norm(p)), 1e-6))
            cu, cv = self._lung_to_image(lung, z, p[None])
            du, dv = g.u - float(cu[0]), g.v - float(cv[0])
            ang = np.arctan2(dv, du)
            lobes = lob[0] * np.cos(2 * (ang - ph[0])) + lob[1] * np.cos(3 * (ang - ph[1]))
            rr = radius * s * (1.0 + lobes)
            return np.sqrt(du * du + dv * dv) * (1.0 + bamp * edge.at(z)) < rr

        return Lesion(z0, z1, shape, delta, 3.0 if solid else 6.0, 0.5 if solid else 0.9)


PHANTOMS: dict[str, type[HeadPhantom] | type[ChestPhantom]] = {
    "hemorrhage": HeadPhantom,
    "nodule": ChestPhantom,
}
