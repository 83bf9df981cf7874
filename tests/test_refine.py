"""Affinity refinement: offsets and pairs, the sparse random walk against a dense one, the
loss, config checks, and ``pseudo.refine=affinity`` end to end on a tiny synthetic run."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from camseg.checkpoints import (
    AFFINITY,
    CheckpointError,
    checkpoint_kind,
    load_checkpoint,
    read_checkpoint,
)
from camseg.constants import IGNORE_INDEX
from camseg.errors import ConfigError
from camseg.pipeline import run_pipeline
from camseg.pseudo.refine import refine_mode
from camseg.refine.net import affinity_loss
from camseg.refine.pairs import grid_labels, local_offsets, pair_targets
from camseg.refine.walk import neighbourhood, random_walk, transition, walk_cams
from test_pipeline import make_cfg


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny tensors gain nothing from threads; on a loaded 2-core machine they cost a lot.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_offsets_are_inside_the_radius_and_half_covers_the_disc_once() -> None:
    r = 4
    half = local_offsets(r)
    disc = {
        (dy, dx)
        for dy in range(-r, r + 1)
        for dx in range(-r, r + 1)
        if 0 < dy * dy + dx * dx < r * r
    }
    assert all(0 < dy * dy + dx * dx < r * r for dy, dx in half)
    mirrored = {(-dy, -dx) for dy, dx in half}
    assert set(half).isdisjoint(mirrored) and set(half) | mirrored == disc
    assert set(local_offsets(r, half=False)) == disc
    with pytest.raises(ConfigError, match="radius"):
        local_offsets(1)


def test_pairs_join_only_confident_cells_within_the_radius() -> None:
    gen = np.random.default_rng(0)
    labels = gen.choice([0, 1, 2, IGNORE_INDEX], size=(2, 7, 9), p=[0.4, 0.2, 0.2, 0.2])
    offsets = local_offsets(3)
    got = pair_targets(torch.from_numpy(labels), offsets)
    b, h, w = labels.shape
    want = {k: np.zeros((b, len(offsets), h, w), bool) for k in ("bg_pos", "fg_pos", "neg")}
    for n in range(b):
        for p, (dy, dx) in enumerate(offsets):
            for i in range(h):
                for j in range(w):
                    if not (0 <= i + dy < h and 0 <= j + dx < w):
                        continue
                    a, c = labels[n, i, j], labels[n, i + dy, j + dx]
                    if IGNORE_INDEX in (a, c):
                        continue
                    key = "neg" if a != c else ("bg_pos" if a == 0 else "fg_pos")
                    want[key][n, p, i, j] = True
    for key in want:
        np.testing.assert_array_equal(got[key].numpy(), want[key], err_msg=key)
    assert sum(int(v.sum()) for v in want.values()) > 50  # the draw has pairs of every kind


def test_grid_labels_keep_only_pure_cells() -> None:
    mask = np.zeros((8, 8), np.uint8)
    mask[:4, :4] = 1  # a pure foreground cell
    mask[4:, :4] = 1
    mask[7, 0] = 0  # a mixed cell
    mask[0, 7] = IGNORE_INDEX  # touches the ignore band
    got = grid_labels(torch.from_numpy(mask)[None], (2, 2))[0].numpy()
    np.testing.assert_array_equal(got, [[1, IGNORE_INDEX], [IGNORE_INDEX, 0]])


def _two_regions(h: int, w: int, split: int, offsets: list[tuple[int, int]]) -> torch.Tensor:
    """Half-disc affinities: 1 between cells of the same region (columns < split, >= split)."""
    region = (torch.arange(w) >= split).expand(h, w)
    aff = []
    for dy, dx in offsets:
        a = torch.zeros(h, w, dtype=torch.float64)
        for i in range(h):
            for j in range(w):
                if 0 <= i + dy < h and 0 <= j + dx < w and region[i, j] == region[i + dy, j + dx]:
                    a[i, j] = 1.0
        aff.append(a)
    return torch.stack(aff)[None]


def _dense_transition(h: int, w: int, split: int, r: int) -> np.ndarray:
    """The same walk as a dense (HW)x(HW) row-normalised matrix, built independently."""
    n = h * w
    a = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            (yi, xi), (yj, xj) = divmod(i, w), divmod(j, w)
            near = (yi - yj) ** 2 + (xi - xj) ** 2 < r * r
            if near and (xi >= split) == (xj >= split):
                a[i, j] = 1.0
    return a / a.sum(axis=1, keepdims=True)


def test_random_walk_equals_the_dense_walk_and_stays_in_its_region() -> None:
    h, w, split, r = 5, 8, 3, 3
    offsets = local_offsets(r)
    weights, full = neighbourhood(_two_regions(h, w, split, offsets), offsets)
    trans = transition(weights)
    v0 = torch.zeros(1, 1, h, w, dtype=torch.float64)
    v0[0, 0, 2, 1] = 1.0
    v0[0, 0, 0, 0] = 0.5
    dense = _dense_transition(h, w, split, r)
    got = random_walk(v0, trans.double(), full, 7)[0, 0].numpy().ravel()
    np.testing.assert_allclose(
        got, np.linalg.matrix_power(dense, 7) @ v0.numpy().ravel(), atol=1e-12
    )
    # The limit: the degree-weighted mean of the start values over the seeds' region.
    deg = (dense > 0).sum(axis=1).reshape(h, w)
    left = deg[:, :split]
    expected = (left * v0[0, 0, :, :split].numpy()).sum() / left.sum()
    limit = random_walk(v0, trans.double(), full, 400)[0, 0].numpy()
    np.testing.assert_allclose(limit[:, :split], expected, rtol=1e-9)
    assert (limit[:, split:] == 0).all()


def test_walked_cams_fill_the_seeded_region_and_nothing_else() -> None:
    h, w, split, r = 6, 10, 4, 3
    offsets = local_offsets(r)
    aff = _two_regions(h, w, split, offsets)
    cams = torch.zeros(1, 2, h, w)
    cams[0, 0, 1:3, 0:2] = 1.0  # a CAM peak covering part of the left region
    walked = walk_cams(cams, aff, offsets, beta=8.0, iterations=300)
    assert walked[0, 0, :, :split].min() > 0.99
    assert walked[0, 0, :, split:].max() == 0
    assert walked[0, 1].abs().max() == 0  # a zero map stays zero


def test_affinity_loss_balances_its_three_terms() -> None:
    aff = torch.full((1, 2, 2, 2), 0.5)
    sel = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    bg, neg = sel.clone(), sel.clone()
    bg[0, 0, 0, 0] = True
    neg[0, 1, 1, 1] = True
    loss, parts = affinity_loss(aff, {"bg_pos": bg, "fg_pos": sel, "neg": neg})
    assert float(parts["fg_pos"]) == 0.0
    assert float(loss) == pytest.approx(math.log(2) / 4 + math.log(2) / 2, rel=1e-5)


def _cfg(root: Path, *overrides: str):
    return make_cfg(root, *overrides)  # the pipeline tests' tiny debug=fast config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["pseudo=crf", "+pseudo.refine=affinity"], "pseudo.crf is set"),
        (["pseudo=affinity", "pseudo.refine=crf"], "needs pseudo.crf"),
        (["pseudo=affinity", "pseudo.refine=walk"], "use one of"),
        (["pseudo=affinity", "pseudo.save_cams=false"], "save_cams=true"),
    ],
)
def test_refine_settings_are_checked_in_one_line(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        refine_mode(_cfg(tmp_path, *overrides))


def test_refine_mode_defaults_follow_the_crf() -> None:
    assert refine_mode(_cfg(Path("/nonexistent"))) == "none"
    assert refine_mode(_cfg(Path("/nonexistent"), "pseudo=crf")) == "crf"
    assert refine_mode(_cfg(Path("/nonexistent"), "pseudo=affinity_crf")) == "affinity+crf"


def test_affinity_refinement_end_to_end_resumes_and_records_its_checkpoint(tmp_path: Path) -> None:
    overrides = ["stages=[cls,pseudo]", "pseudo=affinity", "pseudo.affinity.max_epochs=1"]
    overrides.append("pseudo.affinity.iterations=4")
    run_pipeline(_cfg(tmp_path, *overrides))
    pseudo = tmp_path / "runs" / "t" / "pseudo"
    ckpt = pseudo / "affinity" / "checkpoints" / "last.ckpt"
    manifest = json.loads((pseudo / "manifest.json").read_text())
    refine = manifest["refine"]
    assert refine["method"] == "affinity"
    assert refine["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert (tmp_path / "runs" / "t" / refine["checkpoint"]).resolve() == ckpt.resolve()
    assert checkpoint_kind(load_checkpoint(ckpt)) == AFFINITY
    with pytest.raises(CheckpointError, match="affinity checkpoint, not a classifier"):
        read_checkpoint(ckpt, "classifier")
    rows = {p.stem: json.loads(p.read_text()) for p in (pseudo / "rows").glob("*.json")}
    assert rows and all(r["refine"] == "affinity" for r in rows.values())
    for s in manifest["samples"]:
        mask = np.asarray(Image.open(pseudo / s["mask"]))
        assert set(np.unique(mask)) <= {0, 1, IGNORE_INDEX}
        if not any(s["labels"]):
            assert (mask == 0).all()  # negatives stay all background
        fg = np.count_nonzero((mask > 0) & (mask != IGNORE_INDEX)) / mask.size
        assert s["fg_fraction"] == pytest.approx(fg)
    assert "dice" in json.loads((pseudo / "quality.json").read_text())
    # The net learned from PSA seeds (two CRF views of the training CAMs), recorded.
    seeds = json.loads((pseudo / "affinity" / "seeds.json").read_text())
    assert refine["seeds"]["source"] == "crf" and seeds["seeds"] == refine["seeds"]
    seed_ids = {p.stem for p in (pseudo / "affinity" / "seeds").glob("*.png")}
    assert len(seed_ids) == seeds["samples"] > 0 and seed_ids <= set(rows)  # training split only
    parts = ("background_fraction", "foreground_fraction", "ignore_fraction")
    assert sum(seeds[k] for k in parts) == pytest.approx(1.0)
    for sid in seed_ids:
        seed = np.asarray(Image.open(pseudo / "affinity" / "seeds" / f"{sid}.png"))
        assert set(np.unique(seed)) <= {0, 1, IGNORE_INDEX}
        if not any(rows[sid]["labels"]):
            assert (seed == 0).all()

    # A run killed during refinement: some rows not marked, no manifest. The rerun does not
    # train again and ends with the same manifest.
    mtime = ckpt.stat().st_mtime_ns
    for sid in sorted(rows)[::2]:
        row = dict(rows[sid])
        row.pop("refine")
        (pseudo / "rows" / f"{sid}.json").write_text(json.dumps(row))
    (pseudo / "manifest.json").unlink()
    run_pipeline(_cfg(tmp_path, *overrides[1:], "stages=[pseudo]"))
    assert ckpt.stat().st_mtime_ns == mtime
    assert json.loads((pseudo / "manifest.json").read_text()) == manifest


def test_fingerprints_see_the_refine_and_regulariser_keys() -> None:
    from camseg import fingerprint

    base = _cfg(Path("/nonexistent"), "pseudo=affinity")
    walk = _cfg(Path("/nonexistent"), "pseudo=affinity", "pseudo.affinity.radius=3")
    reg = _cfg(Path("/nonexistent"), "model.regulariser=puzzle")
    assert fingerprint.stage_config("pseudo", base) != fingerprint.stage_config("pseudo", walk)
    assert fingerprint.stage_config("cls", base) == fingerprint.stage_config("cls", walk)
    assert fingerprint.stage_config("cls", base) != fingerprint.stage_config("cls", reg)


def _square_shares(size: int, lo: int, hi: int, inside: float) -> torch.Tensor:
    """Shares (1, 2, size, size): the class holds ``inside`` on [lo:hi]², 0.05 elsewhere."""
    fg = torch.full((size, size), 0.05)
    fg[lo:hi, lo:hi] = inside
    return torch.stack([1 - fg, fg])[None]


def test_refined_mask_takes_the_walk_argmax_or_the_crf_posterior() -> None:
    from camseg.cam.policy import PseudoMaskPolicy
    from camseg.pseudo.refine import _refined_mask

    # A 32 px image whose bright square [8:24]² matches the walked class at half size [4:12]².
    image = np.full((32, 32), 40, np.uint8)
    image[8:24, 8:24] = 220
    square = np.zeros((32, 32), bool)
    square[8:24, 8:24] = True
    labels = torch.tensor([1])

    # No CRF: argmax of the shares, ignore where the winner holds less than min_share.
    shares = _square_shares(16, 4, 12, 0.9)
    shares[0, :, 0, 0] = torch.tensor([0.55, 0.45])  # an ambiguous corner cell
    probs, mask = _refined_mask(PseudoMaskPolicy(0.5, 0.3), image, shares, labels, 0.6)
    assert probs.shape == (1, 1, 16, 16) and torch.equal(probs, shares[:, 1:])
    assert mask.shape == (32, 32)
    assert (mask[square] == 1).all()
    assert (mask[:2, :2] == IGNORE_INDEX).all()  # the ambiguous cell, upsampled 2x
    outside = ~square
    outside[:2, :2] = False
    assert (mask[outside] == 0).all()

    # With the CRF: the class shares go through the policy's CRF and thresholds. The walk is
    # sure of the square's middle [5:11]² and unsure (0.45) on a ring [3:13]² that overhangs
    # the bright square by one cell on every side; the CRF (bilateral kernel) settles the ring
    # by the image: foreground on the bright square, background off it.
    crf = {"iterations": 10, "gaussian_sxy": 0.05, "bilateral_sxy": 0.5, "bilateral_srgb": 5}
    policy = PseudoMaskPolicy(0.5, 0.3, crf={**crf, "bg_power": 1.0})
    unsure = _square_shares(16, 3, 13, 0.45)
    unsure[0, 1, 5:11, 5:11] = 0.9
    unsure[0, 0] = 1 - unsure[0, 1]
    argmax = _refined_mask(PseudoMaskPolicy(0.5, 0.3), image, unsure, labels, 0.0)[1]
    assert (argmax == 1).sum() == 12 * 12  # without the CRF only the sure middle
    probs, mask = _refined_mask(policy, image, unsure, labels, 0.6)
    assert probs.shape == (1, 1, 16, 16)
    assert set(np.unique(mask)) <= {0, 1, IGNORE_INDEX}
    fg = mask == 1
    assert (fg & square).sum() / square.sum() > 0.9  # the bright square, ring included
    assert (fg & ~square).sum() < 0.1 * square.sum()  # the ring off the square: background
