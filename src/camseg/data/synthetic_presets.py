"""Presets of the synthetic generator: ``realistic-hemorrhage``, shaped like real head CT.

The default synthetic hemorrhage data is easy on purpose (lesions on half the slices, several
percent of the image, bright against brain). On real head CT (e.g. PhysioNet CT-ICH: about 11 %
positive slices; lesion area median 0.42 % of the slice, p10 0.10 %, p90 1.6 %) the same recipe
can produce all-empty pseudo-masks. This preset reproduces that difficulty so recipes can be
tuned against it:

* about 12 % positive slices, clustered in patients: about 40 % of the patients bleed, each on
  one or two runs of consecutive slices;
* per-slice lesion area drawn so that its quantiles over positive slices are p10 ~ 0.1 %,
  median ~ 0.4 %, p90 ~ 1.6 % of the slice (each lesion's area is kept within 0.1-3 %);
* four kinds of bleed (:data:`LESION_KINDS`): subdural (a wide, thin crescent along the inner
  table), epidural (a short biconvex lens against the inner table), intraventricular (blood
  layering in the dependent part of a lateral ventricle, following its shape) and
  intraparenchymal (irregular blobs);
* values in Hounsfield units: white/grey matter 24-41 HU, CSF 3-10 HU, acute blood 50-78 HU
  (some subacute lesions at 42-50 HU, nearly isodense), skull tables up to 1800 HU, a falx and
  calcifications as hyperdense distractors, scanner blur and 3.5-6 HU noise;
* 512 px slices written as the three CT windows of the CT-ICH converter, stacked as RGB:
  brain (40/80), subdural (80/200), bone (600/2800).

Randomness follows :mod:`camseg.data.synthetic`: one ``SeedSequence`` per patient split into
label, anatomy and lesion streams, so changing ``lesion_prob`` leaves the anatomy (and its
noise) untouched and the same arguments give byte-identical files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from camseg.data.prepare.windowing import WINDOW_PRESETS, apply_windows
from camseg.data.synthetic_shapes import (
    Grid,
    Texture,
    blend_spot,
    ellipse_rho,
    slice_positions,
    smoothstep,
)
from camseg.errors import ConfigError

LESION_KINDS = ("subdural", "epidural", "intraventricular", "intraparenchymal")
KIND_PROBS = (0.3, 0.1, 0.25, 0.35)
CT_WINDOWS = tuple(WINDOW_PRESETS[n] for n in ("brain", "subdural", "bone"))
# Peak area of a lesion run (fraction of the slice), log-normal; the run's rounded profile
# makes the per-slice quantiles p10 / median / p90 about 0.1 / 0.4 / 1.6 %.
AREA_PEAK_MEDIAN, AREA_PEAK_SIGMA = 0.0052, 1.1
AREA_RANGE = (0.001, 0.03)
# Share of a patient's slices covered by its lesion runs, on average (see _positive_runs).
MEAN_POSITIVE_COVERAGE = 0.226
AIR_HU = -1000.0


@dataclass(frozen=True)
class Preset:
    """Generator arguments a preset sets; explicit arguments of ``generate`` override them."""

    name: str
    flavor: str
    patients: int
    slices_per_patient: int
    size: int
    lesion_prob: float
    description: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "realistic-hemorrhage",
            "hemorrhage",
            patients=40,
            slices_per_patient=24,
            size=512,
            lesion_prob=0.12,
            description="axial head CT in Hounsfield units, written as the brain (40/80), "
            "subdural (80/200) and bone (600/2800) windows stacked as RGB. About 12 % of the "
            "slices show a bleed of 0.1-3 % of the slice (median about 0.4 %): thin subdural "
            "crescents, epidural lenses, intraventricular blood and intraparenchymal blobs, "
            "50-78 HU against 24-41 HU brain. A falx and calcifications are hyperdense "
            "distractors in both classes. Per-lesion kinds are listed in lesions.csv.",
        ),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        ConfigError: unknown name.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"synthetic: preset '{name}' is unknown; use one of {sorted(PRESETS)} or none"
        ) from None


# ----------------------------------------------------------------------------- labels


def _streams(seq: np.random.SeedSequence) -> list[np.random.Generator]:
    """Label, anatomy and lesion generators: ``seq.spawn(3)`` of a fresh ``seq``.

    Built from the spawn keys rather than by ``spawn``, which would advance ``seq`` and give
    a second call other streams.
    """
    return [
        np.random.default_rng(
            np.random.SeedSequence(
                seq.entropy, spawn_key=(*seq.spawn_key, k), pool_size=seq.pool_size
            )
        )
        for k in range(3)
    ]


def _positive_runs(
    rng: np.random.Generator, m: int, p: float, force_positive: bool, force_negative: bool
) -> list[tuple[int, int]]:
    """(first, last) slice of each lesion run; about a fraction ``p`` of slices are covered.

    A patient bleeds with probability ``p / MEAN_POSITIVE_COVERAGE``; a bleeding patient has
    one run (two with probability 0.3, merged when they touch) of 6-30 % of its slices each.
    Above ``p = MEAN_POSITIVE_COVERAGE`` every patient bleeds and the runs grow instead. All
    draws are made whatever the outcome, so the forced cases stay deterministic.
    """
    draws = rng.random(8)
    bleeds = draws[0] < p / MEAN_POSITIVE_COVERAGE or force_positive
    stretch = max(1.0, p / MEAN_POSITIVE_COVERAGE)
    runs: list[tuple[int, int]] = []
    if bleeds:
        for k in range(1 + int(draws[1] < 0.3)):
            frac = (0.06 + 0.24 * draws[2 + 2 * k]) * stretch
            length = min(m, max(1, round(m * frac)))
            start = int(draws[3 + 2 * k] * (m - length + 1))
            runs.append((start, start + length - 1))
        if len(runs) == 2 and runs[1][0] <= runs[0][1] + 1 and runs[0][0] <= runs[1][1] + 1:
            runs = [(min(runs[0][0], runs[1][0]), max(runs[0][1], runs[1][1]))]  # one bleed
    if force_negative and (m > 1 or not force_positive):
        covered = {z for a, b in runs for z in range(a, b + 1)}
        if len(covered) == m:  # free one end slice
            drop = 0 if draws[6] < 0.5 else m - 1
            runs = [(a + (a == drop), b - (b == drop)) for a, b in runs if not (a == b == drop)]
    return runs


def slice_labels(
    seq: np.random.SeedSequence,
    slices: int,
    lesion_prob: float,
    *,
    force_positive: bool = False,
    force_negative: bool = False,
) -> np.ndarray:
    """(M,) bool: which slices of this patient show a lesion, without rendering anything."""
    rng = _streams(seq)[0]
    labels = np.zeros(slices, dtype=bool)
    for a, b in _positive_runs(rng, slices, lesion_prob, force_positive, force_negative):
        labels[a : b + 1] = True
    return labels


# ----------------------------------------------------------------------------- anatomy


@dataclass
class _HuSlice:
    hu: np.ndarray  # (H,W) float32 HU before lesions, blur and noise
    brain: np.ndarray  # (H,W) bool inside the inner table
    rho: np.ndarray  # normalised brain-ellipse radius (1 on the inner table)
    angle: np.ndarray  # angle in the brain-ellipse frame
    ventricles: np.ndarray  # (H,W) bool
    parenchyma: np.ndarray  # (H,W) bool: brain away from the table and the ventricles


class _HuHead:
    """Axial head slices in HU: scalp, two-table skull, grey/white matter, CSF, falx, calcs."""

    def __init__(self, rng: np.random.Generator, g: Grid, m: int) -> None:
        self.g = g
        cx, cy = (float(c) for c in rng.normal(0.0, 0.03, 2))
        self.x, self.y = g.local(cx, cy, float(rng.normal(0.0, 0.08)))
        self.a = float(rng.uniform(0.58, 0.68))
        self.b = min(0.8, self.a * float(rng.uniform(1.12, 1.25)))
        self.skull, self.scalp = float(rng.uniform(0.035, 0.055)), float(rng.uniform(0.015, 0.03))
        self.white, self.grey = float(rng.uniform(24, 30)), float(rng.uniform(35, 41))
        self.csf, self.scalp_hu = float(rng.uniform(3, 10)), float(rng.uniform(20, 45))
        self.cortical, self.diploe = float(rng.uniform(1300, 1800)), float(rng.uniform(450, 800))
        self.t = slice_positions(rng, m)
        self.tex = Texture(rng, g.size, 3.0 * g.k, omega=0.35)
        self.vent = [float(v) for v in rng.uniform([0.1, 0.8, 0.2], [0.15, 1.2, 0.45])]
        self.falx = float(rng.uniform(20, 45)) if rng.random() < 0.75 else 0.0
        calcs: list[tuple[float, ...]] = []
        mid = (m - 1) / 2.0 + rng.normal(0.0, m / 8.0)

        def calc(lx: float, ly: float, zc: float, ext: float) -> tuple[float, ...]:
            r, level = rng.uniform([0.6, 90.0], [1.4, 400.0])
            return (float(lx), float(ly), float(zc), float(ext), float(r) * g.k, float(level))

        if rng.random() < 0.6:  # choroid plexus pair
            lx, ly, ext = rng.uniform([0.2, 0.2, 1.0], [0.28, 0.35, 3.0])
            calcs += [calc(side * lx, ly, mid, ext) for side in (-1.0, 1.0)]
        if rng.random() < 0.5:  # pineal
            calcs.append(calc(0.0, rng.uniform(0.15, 0.3), mid + rng.normal(), rng.uniform(0, 2)))
        self.calcs = calcs

    def scale(self, z: int) -> float:
        return math.sqrt(1.0 - (0.6 * self.t[z]) ** 2)

    def has_ventricles(self, z: int) -> bool:
        return 1.0 - (float(self.t[z]) / 0.6) ** 2 > 0.15

    def render(self, z: int) -> _HuSlice:
        g, t, sc = self.g, float(self.t[z]), self.scale(z)
        a, b, x, y = self.a * sc, self.b * sc, self.x, self.y
        rho = np.sqrt((x / a) ** 2 + (y / b) ** 2)
        dn = (rho - 1.0) * math.sqrt(a * b)  # about the distance outside the inner table
        tex = self.tex.at(z)
        skull = self.skull * (1.0 + 0.15 * tex)
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
        spread, vsize, vang = self.vent
        v = max(0.0, 1.0 - (t / 0.6) ** 2)
        vent = np.zeros_like(hu)
        if v > 0.05:
            va, vb = 0.07 * a * vsize * math.sqrt(v), 0.32 * b * vsize * v
            for side in (-1.0, 1.0):
                rv = ellipse_rho(x, y, side * spread * a, -0.05 * b, va, vb, side * vang)
                vent = np.maximum(vent, 1.0 - smoothstep(0.8, 1.0, rv))
            hu += vent * (self.csf + 1.5 * tex - hu)
        if self.falx > 0 and abs(t) < 0.85:
            gap = v * (1.0 - smoothstep(0.25 * b, 0.4 * b, np.abs(y)))
            line = np.exp(-0.5 * (x / (0.6 * g.px)) ** 2) * (rho < 0.93) * (1.0 - gap)
            hu += self.falx * line
        for lx, ly, zc, ext, r, level in self.calcs:
            if abs(z - zc) <= ext:
                blend_spot(hu, ((x - lx * a) ** 2 + (y - ly * b) ** 2) / g.px**2, r, level)
        ventricles = vent > 0.5
        near_vent = ndimage.binary_dilation(ventricles, iterations=max(1, round(g.k)))
        parenchyma = (rho < 0.93) & ~near_vent
        angle = np.arctan2(y / b, x / a)
        return _HuSlice(hu, brain, rho, angle, ventricles, parenchyma)


# ----------------------------------------------------------------------------- lesions

# shape(z, s, slice) -> (H,W) bool; its area grows with the size parameter s in [0, s_max].
_Shape = Callable[[int, float, _HuSlice], np.ndarray]


@dataclass
class _Lesion:
    kind: str
    z0: int
    z1: int
    peak_area: float  # fraction of the slice at the run's middle
    shape: _Shape
    s_max: float
    blood_hu: float
    hetero: float

    def target_px(self, z: int, size: int) -> float:
        zc, half = (self.z0 + self.z1) / 2.0, (self.z1 - self.z0) / 2.0 + 0.75
        profile = 0.45 + 0.55 * math.sqrt(max(0.0, 1.0 - ((z - zc) / half) ** 2))
        lo, hi = AREA_RANGE
        return float(np.clip(self.peak_area * profile**2, lo, hi)) * size * size


def _crescent(rng: np.random.Generator, edge: Texture, epidural: bool) -> tuple[_Shape, float]:
    """Subdural: wide and thin, following the table. Epidural: short, biconvex (a lens).

    ``s`` is the largest thickness (in brain radii); the arc (half-angle) reaches its full
    width at a thickness of ``full``, so small bleeds are short as well as thin.
    """
    theta0 = float(rng.uniform(-math.pi, math.pi))
    width = float(rng.uniform(0.22, 0.45) if epidural else rng.uniform(0.6, 1.3))
    full = 0.15 if epidural else 0.08
    bamp = float(rng.uniform(0.03, 0.12))

    def shape(z: int, s: float, sl: _HuSlice) -> np.ndarray:
        w = width * min(1.0, math.sqrt(s / full))
        dth = np.angle(np.exp(1j * (sl.angle - theta0))) / max(w, 1e-6) * width
        q = np.clip(1.0 - (dth / width) ** 2, 0.0, 1.0)
        prof = q if epidural else np.sqrt(q)
        return sl.brain & (sl.rho > 1.0 - s * prof * (1.0 + bamp * edge.at(z)))

    return shape, 0.6


def _intraventricular(rng: np.random.Generator, head: _HuHead) -> tuple[_Shape, float]:
    """Blood layering in the dependent (posterior) part of one or both lateral ventricles."""
    sides = ((-1.0,), (1.0,), (-1.0, 1.0))[int(rng.integers(0, 3))]

    def shape(z: int, s: float, sl: _HuSlice) -> np.ndarray:
        allowed = sl.ventricles & np.isin(np.sign(head.x), sides)
        if not allowed.any():
            return allowed
        ys = head.y[allowed]
        lo, hi = float(ys.min()), float(ys.max())
        return allowed & (head.y >= hi - s * (hi - lo + head.g.px))

    return shape, 1.0


def _intraparenchymal(
    rng: np.random.Generator, head: _HuHead, z0: int, z1: int, edge: Texture
) -> tuple[_Shape, float]:
    """A union of 1-3 ellipses with a noisy boundary, drifting slowly between slices."""
    r0, phi = math.sqrt(rng.uniform()) * 0.7, rng.uniform(0, 2 * math.pi)
    lx, ly = r0 * math.cos(phi), r0 * math.sin(phi)
    drift, zc = rng.normal(0.0, 0.008, 2), (z0 + z1) / 2.0
    k = int(rng.integers(1, 4))
    offs = rng.normal(0.0, 0.45, (k, 2))
    offs[0] = 0.0
    axes, angs = rng.uniform(0.55, 1.0, (k, 2)), rng.uniform(0, math.pi, k)
    bamp = float(rng.uniform(0.1, 0.3))

    def shape(z: int, s: float, sl: _HuSlice) -> np.ndarray:
        sc = head.scale(z)
        cx = lx * head.a * sc + drift[0] * (z - zc)
        cy = ly * head.b * sc + drift[1] * (z - zc)
        d = np.full(head.x.shape, np.inf, dtype=np.float32)
        for (ox, oy), (ax, ay), ang in zip(offs, axes, angs):
            rho = ellipse_rho(head.x, head.y, cx + ox * s, cy + oy * s, ax * s, ay * s, ang)
            d = np.minimum(d, rho)
        return (d + bamp * edge.at(z) < 1.0) & sl.parenchyma

    return shape, 0.4


def _new_lesion(
    rng: np.random.Generator, head: _HuHead, z0: int, z1: int, peak: float, edge: Texture
) -> _Lesion:
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
    return _Lesion(kind, z0, z1, peak, shape, s_max, blood, float(rng.uniform(2, 5)))


def _fit(lesion: _Lesion, z: int, sl: _HuSlice, size: int) -> np.ndarray:
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


# ----------------------------------------------------------------------------- volumes


@dataclass(frozen=True)
class LesionRecord:
    """One lesion on one slice: its kind and its own pixel count (before the union)."""

    slice: int
    kind: str
    pixels: int


def render_realistic_volume(
    seq: np.random.SeedSequence,
    slices: int,
    size: int,
    lesion_prob: float,
    *,
    force_positive: bool = False,
    force_negative: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[LesionRecord]]:
    """Render one patient of the ``realistic-hemorrhage`` preset.

    Returns:
        images (M,H,W,3) uint8 (brain, subdural, bone windows), masks (M,H,W) uint8 in
        {0, 1} (label = mask.any()), and one :class:`LesionRecord` per lesion and slice.
    """
    label_rng, anat_rng, lesion_rng = _streams(seq)
    g = Grid(size)
    runs = _positive_runs(label_rng, slices, lesion_prob, force_positive, force_negative)
    head = _HuHead(anat_rng, g, slices)
    calib = float(anat_rng.uniform(-3, 3))
    noise_hu = float(anat_rng.uniform(3.5, 6.0))
    edge = Texture(lesion_rng, size, 2.0 * g.k, omega=0.5)
    inner = Texture(lesion_rng, size, 1.5 * g.k, omega=0.5)
    lesions: list[_Lesion] = []
    for z0, z1 in runs:
        peak = AREA_PEAK_MEDIAN * math.exp(AREA_PEAK_SIGMA * float(lesion_rng.standard_normal()))
        peak = min(peak, AREA_RANGE[1])
        if lesion_rng.random() < 0.2:  # a mixed bleed: two kinds sharing the run's area
            share = float(lesion_rng.uniform(0.3, 0.7))
            lesions.append(_new_lesion(lesion_rng, head, z0, z1, share * peak, edge))
            lesions.append(_new_lesion(lesion_rng, head, z0, z1, (1 - share) * peak, edge))
        else:
            lesions.append(_new_lesion(lesion_rng, head, z0, z1, peak, edge))
    blur = max(0.35, 0.7 * size / 512)  # scanner PSF: about 0.7 px at 512 px
    images = np.empty((slices, size, size, 3), dtype=np.uint8)
    masks = np.zeros((slices, size, size), dtype=np.uint8)
    records: list[LesionRecord] = []
    for z in range(slices):
        sl = head.render(z)
        hu = sl.hu
        for les in lesions:
            if les.z0 <= z <= les.z1:
                m = _fit(les, z, sl, size)
                if not m.any():  # keep the label exactly "mask not empty": one pixel at least
                    m = np.zeros_like(m)
                    m[np.unravel_index(int(np.argmax(sl.rho < 0.5)), m.shape)] = True
                value = les.blood_hu + les.hetero * inner.at(z)
                alpha = ndimage.gaussian_filter(m.astype(np.float32), 0.5 * g.k)
                hu += np.maximum(alpha, m * 0.9) * (value - hu)
                masks[z] |= m
                records.append(LesionRecord(z, les.kind, int(m.sum())))
        hu = ndimage.gaussian_filter(hu, blur) + calib
        noise = ndimage.gaussian_filter(
            anat_rng.standard_normal((size, size), dtype=np.float32), 0.6
        )
        hu += noise_hu * noise / max(float(noise.std()), 1e-6)
        images[z] = apply_windows(hu, CT_WINDOWS)
    return images, masks, records
