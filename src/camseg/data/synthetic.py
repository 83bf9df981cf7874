"""Deterministic synthetic CT-like dataset: the embedded default for the demo, the tests and CI.

Each patient is a small volume of axial slices rendered from a handful of random anatomy
parameters, so neighbouring slices are coherent (organs change size smoothly, texture drifts,
a lesion spans a few consecutive slices with a rounded radius profile) and 2.5D input is
meaningful. Two flavors:

* ``hemorrhage``: head cross-section. Brain tissue with texture, a bright skull ring, dark
  ventricles and sulcal CSF; hyperdense lesions that are brighter than brain and darker than
  bone: irregular intraparenchymal blobs (unions of ellipses with a noisy boundary) and
  subdural-like crescents along the inner table. Distractors in every class: calcification-like
  bright spots and a bright falx line.
* ``nodule``: chest cross-section. Body with fat and soft tissue, two dark lung fields, heart,
  spine, ribs and sternum; vessels as moving bright dots and short lines inside the lungs
  (distractors in every class); round-ish, slightly lobulated nodules (solid or ground-glass)
  inside the lung fields as lesions.

Presets (``generate(preset=...)``, :mod:`camseg.data.synthetic_presets`) render other data
through the same writer: ``realistic-hemorrhage`` is head CT in Hounsfield units written as
three CT windows (RGB), with few positive slices and small lesions, shaped like real data.

The image-level label is exactly "the mask is not empty": every positive slice has at least
``min_lesion_area(size)`` lesion pixels (a preset keeps its own small sizes instead, one pixel
at least) and every negative mask is all zero.

Randomness: patient ``i`` draws from ``SeedSequence(seed, spawn_key=(i,))``, split into
independent streams for labels, anatomy, lesions and the shortcut marker. A patient's slices
therefore do not depend on how many patients are generated, and changing ``lesion_prob`` or
``shortcut_marker_prob`` leaves the anatomy untouched. Files are byte-identical for the same
arguments on the same platform and numpy version (PNGs carry no metadata).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from camseg import __version__
from camseg.data.folder import LABELS_CSV
from camseg.data.synthetic_presets import LesionRecord, get_preset, render_realistic_volume
from camseg.data.synthetic_shapes import (
    Grid,
    Texture,
    blend_spot,
    ellipse_rho,
    slice_positions,
    smoothstep,
    splat,
)
from camseg.errors import ConfigError, DatasetError
from camseg.utils.io import png_bytes, remove_path

FLAVORS = ("hemorrhage", "nodule")
MIN_SIZE = 32
# Negatives carry the shortcut marker this much less often than positives.
MARKER_NEGATIVE_FACTOR = 0.2
# Mean length in slices of one lesion run plus the gap after it (at lesion_prob = 0.5: 4 + 4).
MEAN_CYCLE = 8.0
# Progress bar only for runs at least this large (slices).
PROGRESS_MIN_SLICES = 200
AIR = 3.0
# Presets only: one row per lesion and slice (image, kind, pixels).
LESIONS_CSV = "lesions.csv"


def min_lesion_area(size: int) -> int:
    """Fewest lesion pixels on a positive slice of a ``size`` x ``size`` image."""
    return max(20, int(0.0015 * size * size))


def marker_box(size: int) -> tuple[slice, slice]:
    """Rows and columns of the shortcut marker: a small square near the top-left corner."""
    side, off = max(3, round(size / 20)), max(1, size // 32)
    return slice(off, off + side), slice(off, off + side)


def _lesion_labels(
    rng: np.random.Generator, m: int, p: float, force_positive: bool, force_negative: bool
) -> np.ndarray:
    """Per-slice labels from a two-state Markov chain with stationary P(positive) = p.

    Runs of positives average ``MEAN_CYCLE * p`` slices and runs of negatives
    ``MEAN_CYCLE * (1 - p)``, the shorter kept at 1 slice or more; each positive run becomes
    one lesion spanning consecutive slices. The forced slices (see :func:`generate`) come
    from the same draws, so they are deterministic too.
    """
    if p <= 0.5:
        run_pos = max(1.0, MEAN_CYCLE * p)
        run_neg = run_pos * (1.0 - p) / p if p > 0 else math.inf
    else:
        run_neg = max(1.0, MEAN_CYCLE * (1.0 - p))
        run_pos = run_neg * p / (1.0 - p) if p < 1 else math.inf
    draws = rng.random(m + 3)
    labels = np.zeros(m, dtype=bool)
    state = bool(draws[0] < p)
    for z in range(m):
        labels[z] = state
        stay = 1.0 - 1.0 / (run_pos if state else run_neg)
        state = state if draws[z + 1] < stay else not state
    if force_positive and not labels.any():
        length = min(m, 1 + int(draws[-2] * 3))
        start = int(draws[-1] * (m - length + 1))
        labels[start : start + length] = True
    if force_negative and labels.all() and (m > 1 or not force_positive):
        labels[0 if draws[-1] < 0.5 else m - 1] = False
    return labels


def _runs(labels: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) slice of every run of positive labels."""
    padded = np.concatenate([[False], labels, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(s), int(e) - 1) for s, e in zip(edges[::2], edges[1::2])]


# ----------------------------------------------------------------------------- anatomy


@dataclass
class _Slice:
    """One rendered slice of anatomy, handed to the lesion shapes."""

    image: np.ndarray  # (H,W) float32 grey levels
    allowed: np.ndarray  # (H,W) bool: where lesions of this flavor may lie
    tissue: float  # grey level of the tissue the lesions sit in
    rho: np.ndarray | None = None  # head: normalised brain-ellipse radius
    angle: np.ndarray | None = None  # head: angle in the brain-ellipse frame


_Shape = Callable[[int, float, _Slice], np.ndarray]


@dataclass
class _Lesion:
    """One lesion object spanning slices ``z0..z1``.

    ``shape(z, s, slice)`` returns its (H,W) bool mask at slice ``z`` for size factor ``s``
    (the run profile times any growth needed to reach the minimum area).
    """

    z0: int
    z1: int
    shape: _Shape
    delta: float  # grey levels above the tissue
    hetero: float  # amplitude of the internal texture
    edge_px: float  # edge softness (gaussian sigma of the blend, pixels)

    def profile(self, z: int) -> float:
        """Radius factor: largest in the middle of the run, rounded towards its ends."""
        zc, half = (self.z0 + self.z1) / 2.0, (self.z1 - self.z0) / 2.0 + 0.75
        return 0.45 + 0.55 * math.sqrt(max(0.0, 1.0 - ((z - zc) / half) ** 2))


class _Head:
    """Axial head slices: scalp, skull, brain, sulcal CSF, ventricles, falx, calcifications."""

    def __init__(self, rng: np.random.Generator, g: Grid, m: int) -> None:
        self.g = g
        cx, cy = (float(c) for c in rng.normal(0.0, 0.03, 2))
        self.x, self.y = g.local(cx, cy, float(rng.normal(0.0, 0.08)))
        self.a = float(rng.uniform(0.58, 0.68))
        self.b = min(0.8, self.a * float(rng.uniform(1.12, 1.25)))
        self.skull, self.scalp = float(rng.uniform(0.04, 0.065)), float(rng.uniform(0.015, 0.03))
        self.brain, self.cortex = float(rng.uniform(96, 108)), float(rng.uniform(4, 9))
        self.csf, self.bone = float(rng.uniform(38, 55)), float(rng.uniform(228, 246))
        self.scalp_level = float(rng.uniform(78, 95))
        self.t = slice_positions(rng, m)
        self.tex = Texture(rng, g.size, 3.0 * g.k, omega=0.35)
        # Ventricles: lateral offset, size factor, tilt.
        self.vent = [float(v) for v in rng.uniform([0.1, 0.8, 0.2], [0.15, 1.2, 0.45])]
        self.falx = float(rng.uniform(20, 55)) if rng.random() < 0.75 else 0.0
        # Calcifications, independent of the labels: (lx, ly in brain units, centre slice,
        # half-extent in slices, radius px, level).
        calcs: list[tuple[float, ...]] = []
        mid = (m - 1) / 2.0 + rng.normal(0.0, m / 8.0)

        def calc(lx: float, ly: float, zc: float, ext: float) -> tuple[float, ...]:
            r, level = rng.uniform([1.0, 185.0], [2.0, 240.0])
            return (float(lx), float(ly), float(zc), float(ext), float(r) * g.k, float(level))

        if rng.random() < 0.6:  # choroid plexus pair
            lx, ly, ext = rng.uniform([0.2, 0.2, 1.0], [0.28, 0.35, 3.0])
            calcs += [calc(side * lx, ly, mid, ext) for side in (-1.0, 1.0)]
        if rng.random() < 0.5:  # pineal
            calcs.append(calc(0.0, rng.uniform(0.15, 0.3), mid + rng.normal(), rng.uniform(0, 2)))
        for _ in range(int(rng.integers(0, 4))):  # parenchymal
            r, phi = math.sqrt(rng.uniform()) * 0.75, rng.uniform(0, 2 * math.pi)
            zc, ext = rng.uniform(0, m - 1), rng.uniform(0, 2.5)
            calcs.append(calc(r * math.cos(phi), r * math.sin(phi), zc, ext))
        self.calcs = calcs

    def _scale(self, z: int) -> float:
        return math.sqrt(1.0 - (0.6 * self.t[z]) ** 2)

    def render(self, z: int) -> _Slice:
        g, t, sc = self.g, float(self.t[z]), self._scale(z)
        a, b, x, y = self.a * sc, self.b * sc, self.x, self.y
        rho = np.sqrt((x / a) ** 2 + (y / b) ** 2)
        dn = (rho - 1.0) * math.sqrt(a * b)  # about the distance outside the brain
        tex = self.tex.at(z)
        skull = self.skull * (1.0 + 0.15 * tex)
        img = np.full(rho.shape, AIR, dtype=np.float32)
        img = np.where(dn < skull + self.scalp, self.scalp_level + 2.0 * tex, img)
        img = np.where(dn < skull, self.bone + 6.0 * tex, img)
        brain = self.brain + self.cortex * smoothstep(0.84, 0.95, rho) + 3.5 * tex
        brain += (self.csf - brain) * 0.55 * smoothstep(0.965, 0.995, rho)  # sulcal CSF rim
        inside = rho < 1.0
        img = np.where(inside, brain, img).astype(np.float32)
        spread, vsize, vang = self.vent
        v = max(0.0, 1.0 - (t / 0.6) ** 2)
        vent = np.zeros_like(img)
        if v > 0.05:
            va, vb = 0.07 * a * vsize * math.sqrt(v), 0.32 * b * vsize * v
            for side in (-1.0, 1.0):
                rv = ellipse_rho(x, y, side * spread * a, -0.05 * b, va, vb, side * vang)
                vent = np.maximum(vent, 1.0 - smoothstep(0.8, 1.0, rv))
            img += vent * (self.csf + 2.0 * tex - img)
        if self.falx > 0 and abs(t) < 0.85:
            # Interhemispheric falx, interrupted around the ventricles (corpus callosum).
            gap = v * (1.0 - smoothstep(0.25 * b, 0.4 * b, np.abs(y)))
            line = np.exp(-0.5 * (x / (0.7 * g.px)) ** 2) * (rho < 0.93) * (1.0 - gap)
            img += self.falx * line
        for lx, ly, zc, ext, r, level in self.calcs:
            if abs(z - zc) <= ext:
                d2 = ((x - lx * a) ** 2 + (y - ly * b) ** 2) / g.px**2
                blend_spot(img, d2, r, level)
        angle = np.arctan2(y / b, x / a)
        return _Slice(img, inside, self.brain, rho=rho, angle=angle)

    def lesion(self, rng: np.random.Generator, z0: int, z1: int, edge: Texture) -> _Lesion:
        delta, hetero = float(rng.uniform(45, 80)), float(rng.uniform(2, 5))
        shape = (
            self._blob_shape(rng, z0, z1, edge)
            if rng.random() < 0.65
            else self._crescent_shape(rng, edge)
        )
        return _Lesion(z0, z1, shape, delta, hetero, 0.5)

    def _blob_shape(self, rng: np.random.Generator, z0: int, z1: int, edge: Texture) -> _Shape:
        """Intraparenchymal: a union of 1-3 ellipses with a noisy boundary."""
        r0, phi = math.sqrt(rng.uniform()) * 0.68, rng.uniform(0, 2 * math.pi)
        lx, ly = r0 * math.cos(phi), r0 * math.sin(phi)
        drift, zc = rng.normal(0.0, 0.012, 2), (z0 + z1) / 2.0
        size = float(rng.uniform(0.065, 0.16))
        k = int(rng.integers(1, 4))
        offs = rng.normal(0.0, 0.45, (k, 2)) * size
        offs[0] = 0.0
        axes, angs = size * rng.uniform(0.55, 1.0, (k, 2)), rng.uniform(0, math.pi, k)
        bamp = float(rng.uniform(0.1, 0.3))

        def shape(z: int, s: float, sl: _Slice) -> np.ndarray:
            sc = self._scale(z)
            cx = lx * self.a * sc + drift[0] * (z - zc)
            cy = ly * self.b * sc + drift[1] * (z - zc)
            d = np.full(self.x.shape, np.inf, dtype=np.float32)
            for (ox, oy), (ax, ay), ang in zip(offs, axes, angs):
                rho = ellipse_rho(self.x, self.y, cx + ox * s, cy + oy * s, ax * s, ay * s, ang)
                d = np.minimum(d, rho)
            return d + bamp * edge.at(z) < 1.0

        return shape

    def _crescent_shape(self, rng: np.random.Generator, edge: Texture) -> _Shape:
        """Subdural-like: a crescent along the inner table, thickest in its middle."""
        theta0, width = rng.uniform(-math.pi, math.pi), float(rng.uniform(0.4, 0.9))
        thick, bamp = float(rng.uniform(0.1, 0.22)), float(rng.uniform(0.05, 0.2))

        def shape(z: int, s: float, sl: _Slice) -> np.ndarray:
            assert sl.rho is not None and sl.angle is not None
            dth = np.angle(np.exp(1j * (sl.angle - theta0)))
            prof = np.sqrt(np.clip(1.0 - (dth / width) ** 2, 0.0, 1.0))
            t = thick * s * prof * (1.0 + bamp * edge.at(z))
            return (sl.rho < 1.0) & (sl.rho > 1.0 - t)

        return shape


class _Chest:
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

    def render(self, z: int) -> _Slice:
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
        return _Slice(img, lungs, self.lung)

    def lesion(self, rng: np.random.Generator, z0: int, z1: int, edge: Texture) -> _Lesion:
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

        def shape(z: int, s: float, sl: _Slice) -> np.ndarray:
            p = p0 + drift * (z - zc)
            p = p * min(1.0, 0.85 / max(float(np.linalg.norm(p)), 1e-6))
            cu, cv = self._lung_to_image(lung, z, p[None])
            du, dv = g.u - float(cu[0]), g.v - float(cv[0])
            ang = np.arctan2(dv, du)
            lobes = lob[0] * np.cos(2 * (ang - ph[0])) + lob[1] * np.cos(3 * (ang - ph[1]))
            rr = radius * s * (1.0 + lobes)
            return np.sqrt(du * du + dv * dv) * (1.0 + bamp * edge.at(z)) < rr

        return _Lesion(z0, z1, shape, delta, 3.0 if solid else 6.0, 0.5 if solid else 0.9)


_ANATOMY: dict[str, type[_Head] | type[_Chest]] = {"hemorrhage": _Head, "nodule": _Chest}


# ----------------------------------------------------------------------------- volumes


def _fit_lesion(lesion: _Lesion, z: int, sl: _Slice, min_area: int) -> np.ndarray:
    """The lesion's mask at slice z inside the allowed region, grown to at least ``min_area``."""
    scale = 1.0
    for _ in range(6):
        m = lesion.shape(z, lesion.profile(z) * scale, sl) & sl.allowed
        if int(m.sum()) >= min_area:
            return m
        scale *= 1.35
    # The lesion drifted out of its organ: fall back to a disc at the organ's deepest point.
    dist = ndimage.distance_transform_edt(sl.allowed)
    r0, c0 = np.unravel_index(int(np.argmax(dist)), dist.shape)
    rows, cols = np.indices(dist.shape)
    disc = (rows - r0) ** 2 + (cols - c0) ** 2 <= (math.sqrt(min_area / math.pi) + 1.0) ** 2
    m = disc & sl.allowed
    return m if int(m.sum()) >= min_area else disc


def render_volume(
    rng: np.random.Generator | np.random.SeedSequence,
    flavor: str,
    slices: int,
    size: int,
    lesion_prob: float = 0.5,
    *,
    force_positive: bool = False,
    force_negative: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one patient's volume.

    Args:
        rng: a SeedSequence (split into label, anatomy and lesion streams) or a Generator
            (three streams are seeded from it).
        flavor: one of :data:`FLAVORS`.
        slices: number of slices M.
        size: image height and width.
        lesion_prob: stationary probability that a slice shows a lesion.
        force_positive: make at least one slice positive.
        force_negative: make at least one slice negative (when M > 1 or not force_positive).

    Returns:
        images (M,H,W) uint8 and masks (M,H,W) uint8 in {0, 1}; label = mask.any().
    """
    if isinstance(rng, np.random.SeedSequence):
        streams = [np.random.default_rng(s) for s in rng.spawn(3)]
    else:
        streams = [np.random.default_rng(s) for s in rng.integers(0, 2**63, 3)]
    label_rng, anat_rng, lesion_rng = streams
    g = Grid(size)
    labels = _lesion_labels(label_rng, slices, lesion_prob, force_positive, force_negative)
    anatomy = _ANATOMY[flavor](anat_rng, g, slices)
    gain, offset = float(anat_rng.uniform(0.94, 1.06)), float(anat_rng.uniform(-6, 6))
    q = float(anat_rng.uniform(3.0, 5.5))
    edge = Texture(lesion_rng, size, 2.0 * g.k, omega=0.5)
    inner = Texture(lesion_rng, size, 1.5 * g.k, omega=0.5)
    lesions = []
    for z0, z1 in _runs(labels):
        lesions.append(anatomy.lesion(lesion_rng, z0, z1, edge))
        if z1 > z0 and lesion_rng.random() < 0.25:  # a second, shorter lesion in the same run
            a, b = sorted(int(v) for v in lesion_rng.integers(z0, z1 + 1, 2))
            lesions.append(anatomy.lesion(lesion_rng, a, b, edge))
    min_area = min_lesion_area(size)
    images = np.empty((slices, size, size), dtype=np.uint8)
    masks = np.zeros((slices, size, size), dtype=np.uint8)
    for z in range(slices):
        sl = anatomy.render(z)
        img = sl.image
        for les in lesions:
            if les.z0 <= z <= les.z1:
                m = _fit_lesion(les, z, sl, min_area)
                value = sl.tissue + les.delta + les.hetero * inner.at(z)
                alpha = ndimage.gaussian_filter(m.astype(np.float32), les.edge_px * g.k)
                img += alpha * (value - img)
                masks[z] |= m
        img = ndimage.gaussian_filter(img, 0.55 * g.k) * gain + offset  # scanner blur
        noise = ndimage.gaussian_filter(
            anat_rng.standard_normal((size, size), dtype=np.float32), 0.6
        )
        img += q * noise / max(float(noise.std()), 1e-6)
        images[z] = np.rint(np.clip(img, 0.0, 255.0)).astype(np.uint8)
    return images, masks


# ----------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class _Spec:
    """The arguments that determine a dataset's bytes, in :func:`generate`'s order."""

    flavor: str
    patients: int
    slices_per_patient: int
    size: int
    seed: int
    shortcut_marker_prob: float
    lesion_prob: float
    preset: str | None = None

    def check(self) -> None:
        if self.flavor not in FLAVORS:
            raise ConfigError(
                f"synthetic: flavor '{self.flavor}' is unknown; use one of {list(FLAVORS)}"
            )
        if self.preset is not None and self.flavor != get_preset(self.preset).flavor:
            raise ConfigError(
                f"synthetic: preset '{self.preset}' renders flavor "
                f"'{get_preset(self.preset).flavor}', not '{self.flavor}'; drop the flavor"
            )
        lows = {"patients": 1, "slices_per_patient": 1, "size": MIN_SIZE, "seed": 0}
        for name, low in lows.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
                raise ConfigError(f"synthetic: {name}={value!r}; use an integer >= {low}")
        for name in ("shortcut_marker_prob", "lesion_prob"):
            p = getattr(self, name)
            if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
                raise ConfigError(f"synthetic: {name}={p!r}; use a probability between 0 and 1")


_WHAT = {
    "hemorrhage": "axial head CT-like slices (scalp, skull, brain, ventricles). Lesions are "
    "hyperdense intraparenchymal blobs and subdural-like crescents along the skull. "
    "Calcification-like bright spots and a bright falx line appear in both classes.",
    "nodule": "axial chest CT-like slices (body, lungs, heart, spine, ribs). Lesions are "
    "round-ish solid or ground-glass nodules inside the lungs. Vessels (bright dots and short "
    "lines in the lungs) appear in both classes.",
}


def _readme(spec: _Spec, n_pos: int, n_marked: tuple[int, int]) -> str:
    total = spec.patients * spec.slices_per_patient
    # Strings in double quotes, as ruff writes Python; no preset: the README of before presets.
    fields = {k: v for k, v in asdict(spec).items() if not (k == "preset" and v is None)}
    args = ",\n    ".join(
        f'{k}="{v}"' if isinstance(v, str) else f"{k}={v!r}" for k, v in fields.items()
    )
    what = get_preset(spec.preset).description if spec.preset else _WHAT[spec.flavor]
    title = spec.preset or spec.flavor
    pixels = "RGB (3 CT windows)" if spec.preset else "grayscale"
    side = (
        "\n`lesions.csv` lists each lesion on each slice: `image,kind,pixels`."
        if spec.preset
        else ""
    )
    marker = (
        f"A bright square near the top-left corner (a label-correlated shortcut, see the "
        f"`generate` docstring) is drawn on {n_marked[0]} positive and {n_marked[1]} negative "
        f"slices; masks never include it."
        if spec.shortcut_marker_prob > 0
        else "No shortcut marker."
    )
    return f"""# Synthetic camseg dataset: {title}

Not patient data: {what}

Generated by `camseg.data.synthetic` (camseg {__version__}); re-create it byte for byte with:

```python
from camseg.data.synthetic import generate
generate(
    "OUT",
    {args},
)
```

| parameter | value |
|---|---|
| flavor | {spec.flavor} |
| seed | {spec.seed} |
| patients | {spec.patients} (groups `P000`, `P001`, ...) |
| slices per patient | {spec.slices_per_patient} |
| image size | {spec.size} x {spec.size}, 8-bit {pixels} |
| slices | {total} ({n_pos} positive, {total - n_pos} negative) |
| lesion_prob | {spec.lesion_prob} |
| shortcut_marker_prob | {spec.shortcut_marker_prob} |

{marker}

Layout: `labels.csv` with columns `image,mask,group,slice,{spec.flavor}`;
`images/<patient>_<slice>.png` and `masks/<patient>_<slice>.png` (0 background, 1 lesion).
A slice is labelled 1 exactly when its mask is not empty. The slices of one patient form one
coherent volume: a lesion spans consecutive slices.{side}
"""


def generate(
    out: str | Path,
    flavor: str = "hemorrhage",
    patients: int | None = None,
    slices_per_patient: int | None = None,
    size: int | None = None,
    seed: int = 0,
    shortcut_marker_prob: float = 0.0,
    lesion_prob: float | None = None,
    overwrite: bool = False,
    preset: str | None = None,
) -> Path:
    """Write a synthetic dataset in the camseg folder format and return its root.

    The root is built in a sibling ``OUT.partial-<pid>`` directory and renamed onto ``out``
    only when complete. Every dataset can train a classifier: patient ``P000`` always has a
    positive slice and ``P001`` (or ``P000`` when it is the only patient and has more than
    one slice) a negative one, even at ``lesion_prob`` 0 or 1.

    Args:
        out: dataset root to create.
        flavor: ``"hemorrhage"`` (head CT) or ``"nodule"`` (chest CT); also the class column.
        patients: number of patients (groups ``P000``, ``P001``, ...); default 40 (or the
            preset's).
        slices_per_patient: slices per patient volume; default 16 (or the preset's).
        size: image height and width in pixels (>= 32); default 128 (or the preset's).
        seed: non-negative integer; the same arguments give byte-identical files.
        shortcut_marker_prob: probability p of drawing a bright square marker near the
            top-left corner on a positive slice (p / 5 on a negative one). It imitates the
            label-correlated shortcuts (hospital tokens, "portable" tags) that CAMs caught
            chest X-ray classifiers relying on: with p > 0 a classifier can score well while
            its CAMs point at the corner instead of the lesion. Masks never include it, and the
            rest of every image is the same as with p = 0.
        lesion_prob: expected fraction of slices that show a lesion; default 0.5 (or the
            preset's).
        overwrite: replace an existing non-empty ``out`` (only after the new one is complete).
        preset: ``None`` or a name from :data:`camseg.data.synthetic_presets.PRESETS`
            (``"realistic-hemorrhage"``: HU head CT as three CT windows in RGB, about 12 %
            positive slices with lesions of 0.1-3 % of the slice); it renders the slices
            and sets the defaults above, which explicit arguments override.

    Raises:
        ConfigError: an argument out of range.
        DatasetError: ``out`` exists and is not empty, and ``overwrite`` is False.
    """
    base = get_preset(preset) if preset is not None else None
    spec = _Spec(
        flavor,
        patients if patients is not None else (base.patients if base else 40),
        slices_per_patient
        if slices_per_patient is not None
        else (base.slices_per_patient if base else 16),
        size if size is not None else (base.size if base else 128),
        seed,
        shortcut_marker_prob,
        lesion_prob if lesion_prob is not None else (base.lesion_prob if base else 0.5),
        preset,
    )
    spec.check()
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(
            f"{out}: already exists and is not empty; "
            "choose a new folder or pass overwrite=True to replace it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    remove_path(partial, out.parent)
    try:
        n_pos, n_marked = _write_dataset(partial, spec)
        readme = _readme(spec, n_pos, n_marked)
        (partial / "README.md").write_text(readme, encoding="utf-8")
        _replace(partial, out, overwrite)
    finally:
        remove_path(partial, out.parent)
    return out


def _write_dataset(root: Path, spec: _Spec) -> tuple[int, tuple[int, int]]:
    """Render every patient into ``root``; return (#positives, (#marked pos, #marked neg))."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    m, p = spec.slices_per_patient, spec.shortcut_marker_prob
    width = max(3, len(str(spec.patients - 1)))
    box = marker_box(spec.size)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "mask", "group", "slice", spec.flavor])
    side = io.StringIO()
    side_writer = csv.writer(side, lineterminator="\n")
    side_writer.writerow(["image", "kind", "pixels"])
    n_pos, marked_pos, marked_neg = 0, 0, 0
    quiet = spec.patients * m < PROGRESS_MIN_SLICES
    # disable=None: tqdm shows the bar only on a terminal.
    for i in tqdm(
        range(spec.patients),
        desc=f"synthetic {spec.flavor}",
        unit="patient",
        disable=True if quiet else None,
    ):
        pid = f"P{i:0{width}d}"
        volume_ss, marker_ss = np.random.SeedSequence(spec.seed, spawn_key=(i,)).spawn(2)
        force = {"force_positive": i == 0, "force_negative": i == 1 or spec.patients == 1}
        records: list[LesionRecord] = []
        if spec.preset is None:
            images, masks = render_volume(
                volume_ss, spec.flavor, m, spec.size, spec.lesion_prob, **force
            )
        else:
            images, masks, records = render_realistic_volume(
                volume_ss, m, spec.size, spec.lesion_prob, **force
            )
        for r in records:
            side_writer.writerow([f"images/{pid}_{r.slice:03d}.png", r.kind, r.pixels])
        marker_draws = np.random.default_rng(marker_ss).random(m)
        for z in range(m):
            positive = bool(masks[z].any())
            if marker_draws[z] < (p if positive else p * MARKER_NEGATIVE_FACTOR):
                images[z][box] = 255
                marked_pos, marked_neg = marked_pos + positive, marked_neg + (not positive)
            name = f"{pid}_{z:03d}.png"
            # Plain writes: the whole folder is renamed into place only once it is complete.
            (root / "images" / name).write_bytes(png_bytes(images[z]))
            (root / "masks" / name).write_bytes(png_bytes(masks[z]))
            writer.writerow([f"images/{name}", f"masks/{name}", pid, z, int(positive)])
            n_pos += positive
    (root / LABELS_CSV).write_text(buf.getvalue(), encoding="utf-8")
    if spec.preset is not None:
        (root / LESIONS_CSV).write_text(side.getvalue(), encoding="utf-8")
    return n_pos, (marked_pos, marked_neg)


def _replace(partial: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``partial`` onto ``out``; an old ``out`` is removed only afterwards."""
    if not overwrite:
        try:
            os.rename(partial, out)  # atomic; takes the place of an empty folder, never a full one
        except OSError:
            if not (out.is_dir() and any(out.iterdir())):
                raise
            # Another process (another DDP rank, say) finished the same dataset first: keep it.
        return
    old = None
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists() or out.is_symlink():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(partial, out)
    if old is not None:
        remove_path(old, out.parent)


def generate_if_asked(
    root: str | Path, spec: dict | None, data_dir: str | Path | None = None
) -> bool:
    """Generate the synthetic dataset into ``root`` when the data config asks for it.

    Only a config with a generation ``spec`` (``data=synthetic``) generates, and only into
    camseg's own data directory ``data_dir`` (``paths.data_dir``): a mistyped ``data.root``
    is refused, never filled with 640 synthetic images. ``data_dir=None`` (a Python caller
    naming ``root`` itself) generates into ``root``. Returns whether it generated.

    Raises:
        DatasetError: ``root`` lacks a labels.csv and lies outside ``data_dir``.
    """
    root = Path(root)
    if not spec or (root / LABELS_CSV).is_file():
        return False
    if data_dir is not None:
        base = Path(data_dir).resolve()
        target = root.resolve()
        if target == base or not target.is_relative_to(base):
            raise DatasetError(
                f"data.root={root}: no labels.csv there, and camseg generates its synthetic dataset "
                f"only inside its data directory {base} (paths.data_dir), never into a folder you name; "
                "fix the path, and add data=default to train on your own dataset"
            )
    generate(root, **spec)
    return True
