"""Rendering one synthetic patient: slice labels, lesion runs, lesions fitted into the anatomy.

:func:`render_volume` draws the labels (a Markov chain over slices), the phantom of the
flavor (:mod:`camseg.data.synthetic_phantoms`) and one lesion per run of positive slices,
then blends the lesions in, blurs and adds noise. :mod:`camseg.data.synthetic` writes the
volumes as a dataset.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from camseg.data.synthetic_phantoms import PHANTOMS, Lesion, PhantomSlice
from camseg.data.synthetic_shapes import Grid, Texture, add_scanner_noise

# Mean length in slices of one lesion run plus the gap after it (at lesion_prob = 0.5: 4 + 4).
MEAN_CYCLE = 8.0


def min_lesion_area(size: int) -> int:
    """Fewest lesion pixels on a positive slice of a ``size`` x ``size`` image."""
    return max(20, int(0.0015 * size * size))


def lesion_labels(
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


def positive_runs(labels: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) slice of every run of positive labels."""
    padded = np.concatenate([[False], labels, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(s), int(e) - 1) for s, e in zip(edges[::2], edges[1::2])]


def fit_lesion(lesion: Lesion, z: int, sl: PhantomSlice, min_area: int) -> np.ndarray:
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
        flavor: ``"hemorrhage"`` or ``"nodule"`` (a key of :data:`PHANTOMS`).
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
    labels = lesion_labels(label_rng, slices, lesion_prob, force_positive, force_negative)
    anatomy = PHANTOMS[flavor](anat_rng, g, slices)
    gain, offset = float(anat_rng.uniform(0.94, 1.06)), float(anat_rng.uniform(-6, 6))
    q = float(anat_rng.uniform(3.0, 5.5))
    edge = Texture(lesion_rng, size, 2.0 * g.k, omega=0.5)
    inner = Texture(lesion_rng, size, 1.5 * g.k, omega=0.5)
    lesions = []
    for z0, z1 in positive_runs(labels):
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
                m = fit_lesion(les, z, sl, min_area)
                value = sl.tissue + les.delta + les.hetero * inner.at(z)
                alpha = ndimage.gaussian_filter(m.astype(np.float32), les.edge_px * g.k)
                img += alpha * (value - img)
                masks[z] |= m
        img = ndimage.gaussian_filter(img, 0.55 * g.k) * gain + offset  # scanner blur
        add_scanner_noise(img, anat_rng, q)
        images[z] = np.rint(np.clip(img, 0.0, 255.0)).astype(np.uint8)
    return images, masks
