"""Affinity seeds (PSA's two CRF views) and the random walk with a background channel, each
against a value computed independently."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from camseg.constants import IGNORE_INDEX
from camseg.errors import ConfigError
from camseg.pseudo.refine_seeds import SeedConfig
from camseg.refine.pairs import local_offsets
from camseg.refine.seeds import combine_seeds, posterior_labels
from camseg.refine.walk import labels_from_walk, walk_with_background


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_posterior_labels_give_the_background_what_the_classes_leave() -> None:
    probs = torch.tensor([[[[0.6, 0.2, 0.2]], [[0.3, 0.7, 0.1]]]])  # (1,2,1,3)
    present = torch.tensor([[True, True]])
    # background = 1 - sum: 0.1, 0.1, 0.7
    assert posterior_labels(probs, present)[0, 0].tolist() == [1, 2, 0]
    # an absent class never wins, even with the largest probability
    assert posterior_labels(probs, torch.tensor([[False, True]]))[0, 0].tolist() == [0, 2, 0]
    assert posterior_labels(probs, torch.tensor([[False, False]])).eq(0).all()


def test_seeds_are_confident_foreground_confident_background_and_ignore_between() -> None:
    # One class on a 1x6 row: the strong-background view keeps foreground only at the core,
    # the weak-background view calls background only far away.
    fg_view = torch.tensor([[[[0.9, 0.8, 0.4, 0.3, 0.1, 0.0]]]])
    bg_view = torch.tensor([[[[1.0, 0.9, 0.8, 0.7, 0.3, 0.1]]]])
    present = torch.tensor([[True]])
    seeds = combine_seeds(fg_view, bg_view, present)
    assert seeds[0, 0].tolist() == [1, 1, IGNORE_INDEX, IGNORE_INDEX, 0, 0]
    # the weak-background view's background wins where the two disagree (PSA)
    clash = combine_seeds(torch.tensor([[[[0.9]]]]), torch.tensor([[[[0.2]]]]), present)
    assert clash.item() == 0
    # a negative image is all background seed
    assert combine_seeds(fg_view, bg_view, torch.tensor([[False]])).eq(0).all()


def test_the_band_ignores_background_seeds_near_foreground_only() -> None:
    fg_view = torch.zeros(1, 1, 9, 9)
    fg_view[0, 0, 4, 4] = 1.0
    bg_view = fg_view.clone()
    seeds = combine_seeds(fg_view, bg_view, torch.tensor([[True]]), band=2)[0].numpy()
    ys, xs = np.mgrid[:9, :9]
    cheb = np.maximum(abs(ys - 4), abs(xs - 4))
    want = np.where(cheb == 0, 1, np.where(cheb <= 2, IGNORE_INDEX, 0))
    np.testing.assert_array_equal(seeds, want)


def test_seed_config_is_checked_in_one_line() -> None:
    assert SeedConfig.from_cfg(None).source == "masks"
    cfg = SeedConfig.from_cfg({"fg_bg_power": 0.2, "bg_bg_power": 2.0, "crf": {"iterations": 3}})
    assert (cfg.crf.iterations, cfg.fg_bg_power) == (3, 0.2)
    assert "bg_power" not in cfg.describe()["crf"]
    with pytest.raises(ConfigError, match=r"fg_bg_power=2\.0 must be > 0 and below"):
        SeedConfig.from_cfg({"fg_bg_power": 2.0, "bg_bg_power": 1.0})
    with pytest.raises(ConfigError, match=r"seeds\.source='cam'"):
        SeedConfig.from_cfg({"source": "cam"})
    with pytest.raises(ConfigError, match=r"unknown keys \['alpha'\]"):
        SeedConfig.from_cfg({"alpha": 4})


def _region_affinity(
    region: np.ndarray, offsets: list[tuple[int, int]], low: float
) -> torch.Tensor:
    """Half-disc affinities: 1 inside a region, ``low`` across regions, 0 off the grid."""
    h, w = region.shape
    aff = np.zeros((len(offsets), h, w))
    for p, (dy, dx) in enumerate(offsets):
        for i in range(h):
            for j in range(w):
                if 0 <= i + dy < h and 0 <= j + dx < w:
                    aff[p, i, j] = 1.0 if region[i, j] == region[i + dy, j + dx] else low
    return torch.from_numpy(aff)[None].float()


def test_the_background_channel_wins_outside_the_seeded_region() -> None:
    # Left region: the lesion, with a CAM peak in part of it; right region: no CAM, but the
    # bloated CAM leaks over the boundary. After the walk the lesion region is class 1 and
    # the other region background, which a walk of the CAM alone cannot say.
    h, w, split, r = 6, 12, 5, 3
    region = np.tile(np.arange(w) >= split, (h, 1))
    offsets = local_offsets(r)
    aff = _region_affinity(region, offsets, low=0.05)
    cams = torch.zeros(1, 1, h, w)
    cams[0, 0, 1:5, 0:4] = 1.0
    cams[0, 0, :, 5:7] = 0.6  # the leak
    shares = walk_with_background(cams, torch.tensor([[True]]), aff, offsets, 8.0, 200, 1.0)
    labels = labels_from_walk(shares, 0.5)[0].numpy()
    np.testing.assert_array_equal(labels, np.where(region, 0, 1))
    assert torch.allclose(shares.sum(dim=1), torch.ones(1, h, w))
    # a negative image: everything background, whatever the CAMs say
    neg = walk_with_background(cams, torch.tensor([[False]]), aff, offsets, 8.0, 20, 1.0)
    assert labels_from_walk(neg, 0.9).eq(0).all()


def test_walk_with_background_equals_a_dense_walk_and_argmax() -> None:
    gen = torch.Generator().manual_seed(0)
    h, w, k, r, beta, steps, bg_power = 5, 6, 2, 3, 2.0, 5, 0.5
    offsets = local_offsets(r)
    aff = torch.rand(1, len(offsets), h, w, generator=gen, dtype=torch.float64)
    for p, (dy, dx) in enumerate(offsets):  # off-grid pairs have no affinity
        for i in range(h):
            for j in range(w):
                if not (0 <= i + dy < h and 0 <= j + dx < w):
                    aff[0, p, i, j] = 0.0
    cams = torch.rand(1, k, h, w, generator=gen, dtype=torch.float64)
    present = torch.tensor([[True, True]])
    got = walk_with_background(cams, present, aff, offsets, beta, steps, bg_power).double()

    # Dense: A[i, j] = aff(i -> j) ** beta, symmetric, self-loops 1; T = D^-1 A; v <- T v.
    n = h * w
    a = np.eye(n)
    for p, (dy, dx) in enumerate(offsets):
        for i in range(h):
            for j in range(w):
                if 0 <= i + dy < h and 0 <= j + dx < w:
                    s, t = i * w + j, (i + dy) * w + (j + dx)
                    a[s, t] = a[t, s] = float(aff[0, p, i, j]) ** beta
    trans = a / a.sum(axis=1, keepdims=True)
    c = cams[0].numpy().reshape(k, n)
    v = np.concatenate([(1 - c.max(axis=0, keepdims=True)) ** bg_power, c])
    for _ in range(steps):
        v = v @ trans.T
    want = v / v.sum(axis=0, keepdims=True)
    np.testing.assert_allclose(got[0].numpy().reshape(k + 1, n), want, rtol=1e-5, atol=1e-6)
    min_share = float(np.median(want.max(axis=0)))  # half the pixels are ambiguous
    want_labels = np.where(want.max(axis=0) >= min_share, want.argmax(axis=0), IGNORE_INDEX)
    got_labels = labels_from_walk(torch.from_numpy(want.reshape(1, k + 1, h, w)), min_share)
    np.testing.assert_array_equal(got_labels[0].numpy().ravel(), want_labels)
    assert 0 < int((want_labels == IGNORE_INDEX).sum()) < n  # the draw exercises both branches


def test_crf_seeds_keep_the_bright_lesion_and_drop_the_cams_bloat() -> None:
    # A bright 8x8 lesion on a dark 40x40 image; the CAM is a blob three times its size,
    # brightest on the lesion. The confident foreground stays inside the lesion, the
    # confident background outside it, and the bloat between is mostly ignored or
    # background: never foreground.
    from camseg.cam.crf import CRFPool
    from camseg.pseudo.refine_seeds import seed_masks

    size = 40
    image = torch.full((1, 3, size, size), 40, dtype=torch.uint8)
    image[..., 16:24, 16:24] = 200
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    dist = ((ys - 19.5) ** 2 + (xs - 19.5) ** 2).sqrt()
    cams = (1.0 - dist / 14.0).clamp(0, 1)[None, None]
    lesion = torch.zeros(size, size, dtype=torch.bool)
    lesion[16:24, 16:24] = True
    config = SeedConfig(fg_bg_power=0.25, bg_bg_power=2.0)  # the CRF's kernels: its defaults
    seeds = seed_masks(cams, torch.tensor([[True]]), image, config, CRFPool(0))[0]
    fg, bg = seeds == 1, seeds == 0
    assert fg.any() and not (fg & ~lesion).any()
    assert bg.any() and not (bg & lesion).any()
    assert int((cams[0, 0] >= 0.3).sum()) > 3 * int(lesion.sum())  # the CAM is bloated
