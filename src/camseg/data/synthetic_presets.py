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

The phantom and its bleeds are in :mod:`camseg.data.synthetic_hu_head`; this module holds
the presets, the slice labels and the rendering of one patient.

Randomness follows :mod:`camseg.data.synthetic`: one ``SeedSequence`` per patient split into
label, anatomy and lesion streams, so changing ``lesion_prob`` leaves the anatomy (and its
noise) untouched and the same arguments give byte-identical files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from camseg.data.prepare.windowing import WINDOW_PRESETS, apply_windows
from camseg.data.synthetic_hu_head import (
    AREA_RANGE,
    Bleed,
    HuHead,
    fit_bleed,
    new_bleed,
)
from camseg.data.synthetic_hu_head import LESION_KINDS as LESION_KINDS  # re-export
from camseg.data.synthetic_shapes import Grid, Texture, add_scanner_noise
from camseg.errors import ConfigError

CT_WINDOWS = tuple(WINDOW_PRESETS[n] for n in ("brain", "subdural", "bone"))
# Peak area of a lesion run (fraction of the slice), log-normal; the run's rounded profile
# makes the per-slice quantiles p10 / median / p90 about 0.1 / 0.4 / 1.6 %.
AREA_PEAK_MEDIAN, AREA_PEAK_SIGMA = 0.0052, 1.1
# Share of a patient's slices covered by its lesion runs, on average (see _positive_runs).
MEAN_POSITIVE_COVERAGE = 0.226


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
    head = HuHead(anat_rng, g, slices)
    calib = float(anat_rng.uniform(-3, 3))
    noise_hu = float(anat_rng.uniform(3.5, 6.0))
    edge = Texture(lesion_rng, size, 2.0 * g.k, omega=0.5)
    inner = Texture(lesion_rng, size, 1.5 * g.k, omega=0.5)
    lesions: list[Bleed] = []
    for z0, z1 in runs:
        peak = AREA_PEAK_MEDIAN * math.exp(AREA_PEAK_SIGMA * float(lesion_rng.standard_normal()))
        peak = min(peak, AREA_RANGE[1])
        if lesion_rng.random() < 0.2:  # a mixed bleed: two kinds sharing the run's area
            share = float(lesion_rng.uniform(0.3, 0.7))
            lesions.append(new_bleed(lesion_rng, head, z0, z1, share * peak, edge))
            lesions.append(new_bleed(lesion_rng, head, z0, z1, (1 - share) * peak, edge))
        else:
            lesions.append(new_bleed(lesion_rng, head, z0, z1, peak, edge))
    blur = max(0.35, 0.7 * size / 512)  # scanner PSF: about 0.7 px at 512 px
    images = np.empty((slices, size, size, 3), dtype=np.uint8)
    masks = np.zeros((slices, size, size), dtype=np.uint8)
    records: list[LesionRecord] = []
    for z in range(slices):
        sl = head.render(z)
        hu = sl.hu
        for les in lesions:
            if les.z0 <= z <= les.z1:
                m = fit_bleed(les, z, sl, size)
                if not m.any():  # keep the label exactly "mask not empty": one pixel at least
                    m = np.zeros_like(m)
                    m[np.unravel_index(int(np.argmax(sl.rho < 0.5)), m.shape)] = True
                value = les.blood_hu + les.hetero * inner.at(z)
                alpha = ndimage.gaussian_filter(m.astype(np.float32), 0.5 * g.k)
                hu += np.maximum(alpha, m * 0.9) * (value - hu)
                masks[z] |= m
                records.append(LesionRecord(z, les.kind, int(m.sum())))
        hu = ndimage.gaussian_filter(hu, blur) + calib
        add_scanner_noise(hu, anat_rng, noise_hu)
        images[z] = apply_windows(hu, CT_WINDOWS)
    return images, masks, records
