"""The head phantom of the ``realistic-hemorrhage`` preset, in Hounsfield units, and its bleeds.

:class:`HuHead` renders scalp, a two-table skull, grey and white matter, CSF, falx and
calcifications in HU on the head frame shared with the plain generator
(:class:`~camseg.data.synthetic_head.HeadFrame`). Four kinds of bleed
(:data:`LESION_KINDS`) grow with a size parameter that :func:`fit_bleed` bisects to the
area a lesion should have on each slice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from camseg.data.synthetic_head import HeadFrame
from camseg.data.synthetic_shapes import Grid, Texture, run_profile, smoothstep

LESION_KINDS = ("subdural", "epidural", "intraventricular", "intraparenchymal")
KIND_PROBS = (0.3, 0.1, 0.25, 0.35)
# Each lesion's area on a slice stays within this fraction of the slice.
AREA_RANGE = (0.001, 0.03)
AIR_HU = -1000.0


@dataclass
class HuSlice:
    """One rendered slice in HU, and the regions the bleeds may take."""

    hu: np.ndarray  # (H,W) float32 HU before lesions, blur and noise
    brain: np.ndarray  # (H,W) bool inside the inner table
    rho: np.ndarray  # normalised brain-ellipse radius (1 on the inner table)
    angle: np.ndarray  # angle in the brain-ellipse frame
    ventricles: np.ndarray  # (H,W) bool
    parenchyma: np.ndarray  # (H,W) bool: brain away from the table and the ventricles


class HuHead(HeadFrame):
    """Axial head slices in HU: scalp, two-table skull, grey/white matter, CSF, falx, calcs."""

    def __init__(self, rng: np.random.Generator, g: Grid, m: int) -> None:
        super().__init__(rng, g)
        self.skull, self.scalp = float(rng.uniform(0.035, 0.055)), float(rng.uniform(0.015, 0.03))
        self.white, self.grey = float(rng.uniform(24, 30)), float(rng.uniform(35, 41))
        self.csf, self.scalp_hu = float(rng.uniform(3, 10)), float(rng.uniform(20, 45))
        self.cortical, self.diploe = float(rng.uniform(1300, 1800)), float(rng.uniform(450, 800))
        self._draw_interior(rng, m, 45, (0.6, 90.0), (1.4, 400.0), parenchymal_calcs=False)

    def has_ventricles(self, z: int) -> bool:
        return 1.0 - (float(self.t[z]) / 0.6) ** 2 > 0.15

    def render(self, z: int) -> HuSlice:
        geo = self.geometry(z)
        rho, dn, tex, skull = geo.rho, geo.dn, geo.tex, geo.skull
        depth = dn / skull  # 0 on the inner table, 1 on the outer one
        bone = self.cortical - (self.cortical - self.diploe) * np.exp(
            -0.5 * ((depth - 0.5) / 0.17) ** 2
        )
        hu = np.full(rho.shape, AIR_HU, dtype=np.float32)
        hu = np.where(dn < skull + self.scalp, self.scalp_hu + 4.0 * tex, hu)
        hu = np.where(dn < skull, bone + 60.0 * tex, hu)
        brain_hu = self.white + (self.grey - self.white) * smoothstep(0.84, 0.95, rho) + 2.0 * tex
        brain_hu += (self.csf - brain_hu) * 0.45 * smoothstep(0.965, 0.995, rho)  # sulcal CSF
        brain = rho < 1.0
        hu = np.where(brain, brain_hu, hu).astype(np.float32)
        vent, v = self.ventricles(geo, hu)
        if v > 0.05:
            hu += vent * (self.csf + 1.5 * tex - hu)
        self.add_falx(hu, geo, v, 0.6)
        self.add_calcifications(hu, geo, z)
        ventricles = vent > 0.5
        near_vent = ndimage.binary_dilation(ventricles, iterations=max(1, round(self.g.k)))
        parenchyma = (rho < 0.93) & ~near_vent
        angle = np.arctan2(self.y / geo.b, self.x / geo.a)
        return HuSlice(hu, brain, rho, angle, ventricles, parenchyma)


# shape(z, s, slice) -> (H,W) bool; its area grows with the size parameter s in [0, s_max].
Shape = Callable[[int, float, HuSlice], np.ndarray]


@dataclass
class Bleed:
    """One bleed spanning slices ``z0..z1``; its area on a slice follows the run's profile."""

    kind: str
    z0: int
    z1: int
    peak_area: float  # fraction of the slice at the run's middle
    shape: Shape
    s_max: float
    blood_hu: float
    hetero: float

    def target_px(self, z: int, size: int) -> float:
        profile = run_profile(z, self.z0, self.z1)
        lo, hi = AREA_RANGE
        return float(np.clip(self.peak_area * profile**2, lo, hi)) * size * size


def _crescent(rng: np.random.Generator, edge: Texture, epidural: bool) -> tuple[Shape, float]:
    """Subdural: wide and thin, following the table. Epidural: short, biconvex (a lens).

    ``s`` is the largest thickness (in brain radii); the arc (half-angle) reaches its full
    width at a thickness of ``full``, so small bleeds are short as well as thin.
    """
    theta0 = float(rng.uniform(-math.pi, math.pi))
    width = float(rng.uniform(0.22, 0.45) if epidural else rng.uniform(0.6, 1.3))
    full = 0.15 if epidural else 0.08
    bamp = float(rng.uniform(0.03, 0.12))

    def shape(z: int, s: float, sl: HuSlice) -> np.ndarray:
        w = width * min(1.0, math.sqrt(s / full))
        dth = np.angle(np.exp(1j * (sl.angle - theta0))) / max(w, 1e-6) * width
        q = np.clip(1.0 - (dth / width) ** 2, 0.0, 1.0)
        prof = q if epidural else np.sqrt(q)
        return sl.brain & (sl.rho > 1.0 - s * prof * (1.0 + bamp * edge.at(z)))

    return shape, 0.6


def _intraventricular(rng: np.random.Generator, head: HuHead) -> tuple[Shape, float]:
    """Blood layering in the dependent (posterior) part of one or both lateral ventricles."""
    sides = ((-1.0,), (1.0,), (-1.0, 1.0))[int(rng.integers(0, 3))]

    def shape(z: int, s: float, sl: HuSlice) -> np.ndarray:
        allowed = sl.ventricles & np.isin(np.sign(head.x), sides)
        if not allowed.any():
            return allowed
        ys = head.y[allowed]
        lo, hi = float(ys.min()), float(ys.max())
        return allowed & (head.y >= hi - s * (hi - lo + head.g.px))

    return shape, 1.0


def _intraparenchymal(
    rng: np.random.Generator, head: HuHead, z0: int, z1: int, edge: Texture
) -> tuple[Shape, float]:
    """A union of 1-3 ellipses with a noisy boundary, drifting slowly between slices."""
    r0, phi = math.sqrt(rng.uniform()) * 0.7, rng.uniform(0, 2 * math.pi)
    centre = (r0 * math.cos(phi), r0 * math.sin(phi), (z0 + z1) / 2.0)
    drift = rng.normal(0.0, 0.008, 2)
    k = int(rng.integers(1, 4))
    offs = rng.normal(0.0, 0.45, (k, 2))
    offs[0] = 0.0
    axes, angs = rng.uniform(0.55, 1.0, (k, 2)), rng.uniform(0, math.pi, k)
    bamp = float(rng.uniform(0.1, 0.3))

    def shape(z: int, s: float, sl: HuSlice) -> np.ndarray:
        d = head.blob_distance(z, s, centre, drift, offs, axes, angs)
        return (d + bamp * edge.at(z) < 1.0) & sl.parenchyma

    return shape, 0.4


def new_bleed(
    rng: np.random.Generator, head: HuHead, z0: int, z1: int, peak: float, edge: Texture
) -> Bleed:
    probs = np.array(KIND_PROBS)
    if not all(head.has_ventricles(z) for z in range(z0, z1 + 1)):
        probs[LESION_KINDS.index("intraventricular")] = 0.0
    kind = LESION_KINDS[int(rng.choice(len(LESION_KINDS), p=probs / probs.sum()))]
    if kind in ("subdural", "epidural"):
        shape, s_max = _crescent(rng, edge, epidural=kind == "epidural")
    elif kind == "intraventricular":
        shape, s_max = _intraventricular(rng, head)
    else:
        shape, s_max = _intraparenchymal(rng, head, z0, z1, edge)
    # Acute blood; one lesion in six subacute, nearly isodense to grey matter.
    blood = float(rng.uniform(42, 50) if rng.random() < 1 / 6 else rng.uniform(50, 78))
    return Bleed(kind, z0, z1, peak, shape, s_max, blood, float(rng.uniform(2, 5)))


def fit_bleed(lesion: Bleed, z: int, sl: HuSlice, size: int) -> np.ndarray:
    """The lesion's mask at slice z, its size parameter bisected to the target area."""
    target = lesion.target_px(z, size)
    lo, hi = 0.0, lesion.s_max
    best = lesion.shape(z, hi, sl)
    if int(best.sum()) <= target:
        return best  # the region is smaller than the target (a small ventricle, say)
    best_err = abs(int(best.sum()) - target)
    for _ in range(14):
        mid = 0.5 * (lo + hi)
        m = lesion.shape(z, mid, sl)
        area = int(m.sum())
        if area and abs(area - target) < best_err:
            best, best_err = m, abs(area - target)
        if area < target:
            lo = mid
        else:
            hi = mid
        if best_err <= 0.02 * target:
            break
    return best
