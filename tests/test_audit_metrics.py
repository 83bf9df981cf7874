"""CAM audit metrics on maps, masks and models whose values are known by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from camseg.audit import metrics as M
from camseg.audit.faithfulness import (
    FastScorer,
    baseline_images,
    confidence_change,
    deletion_insertion,
    salience_ranks,
)


def square(h: int, w: int, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    m = torch.zeros(h, w)
    m[r0:r1, c0:c1] = 1
    return m


def test_energy_pointing_is_one_inside_and_zero_for_a_disjoint_mask() -> None:
    cam = square(16, 16, 2, 6, 3, 9)[None]
    same = cam.bool()
    disjoint = square(16, 16, 10, 14, 10, 14).bool()[None]
    half = square(16, 16, 2, 4, 3, 9).bool()[None]  # 2 of the square's 4 rows
    assert M.energy_pointing(cam, same).tolist() == [1.0]
    assert M.energy_pointing(cam, disjoint).tolist() == [0.0]
    assert M.energy_pointing(cam, half).item() == pytest.approx(0.5)


def test_energy_pointing_is_nan_without_a_lesion_or_without_energy() -> None:
    cams = torch.stack([square(8, 8, 0, 2, 0, 2), torch.zeros(8, 8)])
    masks = torch.stack([torch.zeros(8, 8), square(8, 8, 0, 2, 0, 2)]).bool()
    assert torch.isnan(M.energy_pointing(cams, masks)).all()


def test_pointing_game_tolerance_is_relative_to_the_image_size() -> None:
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, 10, 10] = True
    cam = torch.zeros(1, 32, 32)
    cam[0, 10, 13] = 1.0  # 3 pixels right of the lesion
    assert M.pointing_game(cam, mask).tolist() == [0.0]
    assert M.pointing_game(cam, mask, tolerance=0.05).tolist() == [0.0]  # radius round(1.6) = 2
    assert M.pointing_game(cam, mask, tolerance=0.1).tolist() == [1.0]  # radius round(3.2) = 3
    # The same geometry at twice the resolution gives the same answer.
    big_mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    big_mask[0, 20, 20] = True
    big_cam = torch.zeros(1, 64, 64)
    big_cam[0, 20, 26] = 1.0
    assert M.pointing_game(big_cam, big_mask, tolerance=0.1).tolist() == [1.0]
    assert M.pointing_game(big_cam, big_mask, tolerance=0.05).tolist() == [0.0]


def test_pointing_game_of_a_zero_map_is_undefined_not_a_hit_at_the_origin() -> None:
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 0, 0] = True
    assert math.isnan(M.pointing_game(torch.zeros(1, 8, 8), mask).item())


def test_body_mask_keeps_the_anatomy_fills_its_holes_and_drops_a_corner_marker() -> None:
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    img = (((yy - 16) ** 2 + (xx - 16) ** 2) <= 10**2).float() * 0.5
    img[14:18, 14:18] = 0.0  # a dark ventricle inside
    img[1:3, 1:3] = 1.0  # a bright 2x2 marker in the corner
    body = M.body_mask(img[None], threshold=0.1, opening=0.08)[0]  # 3x3 opening
    assert body[16, 16] and body[16, 8]
    assert not body[1, 1] and not body[2, 2] and not body[31, 31]
    marker_cam = torch.zeros(1, 32, 32)
    marker_cam[0, 1:3, 1:3] = 1.0
    inside_cam = torch.zeros(1, 32, 32)
    inside_cam[0, 12:20, 12:20] = 1.0
    assert M.out_of_body_share(marker_cam, body[None]).tolist() == [1.0]
    assert M.out_of_body_share(inside_cam, body[None]).tolist() == [0.0]


def test_border_and_corner_shares_of_a_uniform_map_are_their_areas() -> None:
    cam = torch.ones(1, 10, 10)
    borders = M.region_shares(cam, M.border_regions(10, 10, 0.2, cam.device))
    corners = M.region_shares(cam, M.corner_regions(10, 10, 0.2, cam.device))
    assert borders[0].tolist() == pytest.approx([0.2] * 4)
    assert corners[0].tolist() == pytest.approx([0.04] * 4)


def test_peak_corner_names_the_corner_and_minus_one_elsewhere() -> None:
    cams = torch.zeros(6, 20, 20)
    cams[0, 1, 1] = 1  # top-left
    cams[1, 0, 19] = 1  # top-right
    cams[2, 18, 2] = 1  # bottom-left
    cams[3, 19, 19] = 1  # bottom-right
    cams[4, 10, 10] = 1  # centre
    # cams[5] all zero: no peak
    got = M.peak_corner(cams, band=0.2).tolist()
    assert got == [0, 1, 2, 3, -1, -1]
    assert [M.CORNERS[i] for i in got[:4]] == list(M.CORNERS)


class RegionMean(nn.Module):
    """Logit 0 = mean of channel 0 over a known region; logit 1 = 0."""

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.region = region

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.region.to(x.dtype)
        logit = (x[:, 0] * r).sum(dim=(1, 2)) / r.sum()
        return torch.stack((logit, torch.zeros_like(logit)), dim=1)


def identity(z: torch.Tensor) -> torch.Tensor:
    return z


def test_deletion_and_insertion_auc_of_a_region_mean_model_match_the_hand_computation() -> None:
    region = square(8, 8, 0, 2, 0, 4)  # 8 of 64 pixels
    model = RegionMean(region)
    images = torch.ones(2, 1, 8, 8)
    # Map 0 ranks the region first, map 1 last.
    saliency = torch.stack((region, 1 - region))
    targets = torch.zeros(2, dtype=torch.long)
    c = deletion_insertion(model, images, saliency, targets, identity, steps=16, batch_size=5)
    # 16 steps of 4 pixels. Map 0: the region goes in steps 1 and 2 (score 1, 0.5, 0, ...).
    assert c.deletion[0, :4].tolist() == [1.0, 0.5, 0.0, 0.0]
    assert c.deletion_auc[0].item() == pytest.approx((0.75 + 0.25) / 16)
    assert c.insertion_auc[0].item() == pytest.approx(1 - 1 / 16)
    # Map 1: the region goes in steps 15 and 16: AUC (14 + 0.75 + 0.25) / 16.
    assert c.deletion[1, -3:].tolist() == [1.0, 0.5, 0.0]
    assert c.deletion_auc[1].item() == pytest.approx(15 / 16)
    assert c.insertion_auc[1].item() == pytest.approx(1 / 16)


def test_deletion_costs_few_forward_passes() -> None:
    calls: list[int] = []
    model = RegionMean(square(8, 8, 0, 2, 0, 4))
    model.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    images = torch.rand(6, 1, 8, 8)
    args = (model, images, torch.rand(6, 8, 8), torch.zeros(6, dtype=torch.long), identity, 10)
    deletion_insertion(*args, None, 132)
    # The plain images, one all-zero baseline for all, then 2 curves x 6 images x the 9
    # inner steps in one pass: the end points are the plain and the baseline image.
    assert calls == [6, 1, 108]
    calls.clear()
    deletion_insertion(*args, None, 132, before=torch.ones(6))
    assert calls == [1, 108]


def naive_curves(
    model: nn.Module, images: torch.Tensor, saliency: torch.Tensor, base: torch.Tensor, steps: int
) -> torch.Tensor:
    """(2,P,steps+1): every point of both curves by its own forward, image by image."""
    p, _, h, w = images.shape
    out = torch.empty(2, p, steps + 1)
    for i in range(p):
        order = torch.argsort(-saliency[i].flatten(), stable=True)
        for s in range(steps + 1):
            top = torch.zeros(h * w, dtype=torch.bool)
            top[order[: round(s / steps * h * w)]] = True
            top = top.view(1, 1, h, w)
            deleted = torch.where(top, base[i : i + 1], images[i : i + 1])
            inserted = torch.where(top, images[i : i + 1], base[i : i + 1])
            out[0, i, s] = model(deleted)[0, 0]
            out[1, i, s] = model(inserted)[0, 0]
    return out


@pytest.mark.parametrize("kind", ["mean", "blur"])
def test_skipping_the_end_points_leaves_the_curves_as_computed_point_by_point(kind: str) -> None:
    g = torch.Generator().manual_seed(3)
    model = RegionMean(square(12, 12, 2, 9, 1, 7))
    images = torch.rand(5, 1, 12, 12, generator=g)
    saliency = torch.rand(5, 12, 12, generator=g)
    base = baseline_images(images, kind)
    with torch.no_grad():
        want = naive_curves(model, images, saliency, base, 7)
    got = deletion_insertion(
        model, images, saliency, torch.zeros(5, dtype=torch.long), identity, 7, base, 16
    )
    assert torch.allclose(got.deletion, want[0], atol=1e-6)
    assert torch.allclose(got.insertion, want[1], atol=1e-6)


def test_salience_ranks_are_a_permutation_with_the_peak_first() -> None:
    s = torch.rand(3, 5, 7)
    ranks = salience_ranks(s)
    assert (ranks.sort(dim=1).values == torch.arange(35)).all()
    assert (ranks.gather(1, s.flatten(1).argmax(1, keepdim=True)) == 0).all()


def test_average_drop_and_increase_of_a_half_weight_map() -> None:
    region = square(8, 8, 0, 2, 0, 4)
    model = RegionMean(region)
    images = torch.ones(2, 1, 8, 8)
    maps = torch.stack((region * 0.5, torch.ones(8, 8) * 2))
    ch = confidence_change(model, images, maps, torch.zeros(2, dtype=torch.long), identity, 1)
    assert ch.before.tolist() == [1.0, 1.0]
    assert ch.after.tolist() == [0.5, 2.0]
    assert ch.drop.tolist() == [0.5, 0.0]
    assert ch.average_drop.tolist() == [0.5, 0.0]
    assert ch.increase.tolist() == [0.0, 1.0]


def test_blur_baseline_keeps_a_constant_image_and_smooths_a_spike() -> None:
    flat = torch.full((1, 2, 16, 16), 0.3)
    assert torch.allclose(baseline_images(flat, "blur"), flat)
    spike = torch.zeros(1, 1, 16, 16)
    spike[0, 0, 8, 8] = 1
    blurred = baseline_images(spike, "blur", blur=0.1)
    assert blurred.max() < 0.2 and blurred.sum().item() == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match="baseline 'noise'"):
        baseline_images(spike, "noise")


def test_the_fast_scorer_gives_the_classifier_s_logits_with_batch_norms_folded() -> None:
    from camseg.models.classifier import CamClassifier

    torch.manual_seed(0)
    model = CamClassifier(2, "resnet18", "torchvision", 1, 16, False).eval()
    with torch.no_grad():  # non-trivial running statistics, so that folding matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    scorer = FastScorer(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in scorer.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the model is untouched
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(scorer(x), model(x), atol=1e-4, rtol=1e-4)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x)).mean(dim=(2, 3))
        return y if y.sum() > 0 else -y


def test_an_untraceable_model_is_scored_unfused() -> None:
    model = Untraceable().eval()
    scorer = FastScorer(model)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(scorer(x), model(x), atol=1e-6)
    assert any(isinstance(m, nn.BatchNorm2d) for m in scorer.modules())
