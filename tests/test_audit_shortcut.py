"""Shortcut flags on hand-built maps: a corner marker is flagged and named, anatomy is not."""

from __future__ import annotations

import math

import pytest
import torch

from camseg.audit import metrics as M
from camseg.audit.shortcut import (
    ShortcutRule,
    dataset_verdict,
    fixed_location,
    image_flags,
    outside_lift,
)
from camseg.errors import ConfigError


def body_and_maps(n: int, on_marker: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` 64x64 images with a central body; the first ``on_marker`` maps rest on a
    top-left marker outside it, the others on a lesion inside."""
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    disc = (((yy - 34) ** 2 + (xx - 34) ** 2) <= 22**2).float() * 0.5
    img = disc.clone()
    img[3:7, 3:7] = 1.0  # the marker: bright, small, in the air
    body = M.body_mask(img.expand(n, 64, 64).contiguous())
    maps = torch.zeros(n, 64, 64)
    for i in range(n):
        if i < on_marker:
            maps[i] = torch.exp(-((yy - 5) ** 2 + (xx - 5) ** 2) / 18.0)
        else:
            cy, cx = 24 + (i * 7) % 20, 24 + (i * 11) % 20  # lesions scattered in the body
            maps[i] = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18.0)
    return body, maps


def flags_of(body: torch.Tensor, maps: torch.Tensor, rule: ShortcutRule) -> list[list[str]]:
    share = M.out_of_body_share(maps, body)
    area = (~body).flatten(1).float().mean(dim=1)
    return image_flags(share, area, M.peak_corner(maps, rule.corner_band), rule)


def test_marker_maps_are_flagged_and_the_dataset_names_the_corner() -> None:
    rule = ShortcutRule()
    body, maps = body_and_maps(12, on_marker=9)
    flags = flags_of(body, maps, rule)
    assert flags[:9] == [["outside_body", "corner:top-left"]] * 9
    assert flags[9:] == [[]] * 3
    v = dataset_verdict(flags, rule)
    assert v["flagged"] and v["corner"] == "top-left"
    assert v["corner_share"]["top-left"] == pytest.approx(0.75)
    assert v["outside_body_share"] == pytest.approx(0.75)
    assert any("top-left corner" in r for r in v["reasons"])


def test_anatomical_maps_are_not_flagged() -> None:
    rule = ShortcutRule()
    body, maps = body_and_maps(12, on_marker=0)
    flags = flags_of(body, maps, rule)
    assert flags == [[]] * 12
    v = dataset_verdict(flags, rule)
    assert not v["flagged"] and v["corner"] is None and v["reasons"] == []


def test_a_few_marker_maps_flag_images_but_not_the_dataset() -> None:
    rule = ShortcutRule(dataset_share=0.25)
    body, maps = body_and_maps(12, on_marker=2)  # 17% < 25%
    v = dataset_verdict(flags_of(body, maps, rule), rule)
    assert v["maps_flagged"] == 2 and not v["flagged"]


def test_a_flat_map_is_not_a_shortcut_however_much_air_surrounds_the_body() -> None:
    rule = ShortcutRule()
    body, _ = body_and_maps(1, 0)
    flat = torch.ones(1, 64, 64)
    share = M.out_of_body_share(flat, body)
    area = (~body).flatten(1).float().mean(dim=1)
    assert share.item() == pytest.approx(area.item()) and share.item() > rule.outside_share
    assert outside_lift(share, area).item() == pytest.approx(1.0)
    assert image_flags(share, area, torch.tensor([-1]), rule) == [[]]


def test_outside_lift_by_hand_and_undefined_without_a_body() -> None:
    # 80% of the energy on 40% of the area: (0.8/0.4) / (0.2/0.6) = 6.
    assert outside_lift(torch.tensor([0.8]), torch.tensor([0.4])).item() == pytest.approx(6.0)
    assert math.isnan(outside_lift(torch.tensor([0.5]), torch.tensor([1.0])).item())


def test_an_empty_audit_flags_nothing() -> None:
    v = dataset_verdict([], ShortcutRule())
    assert not v["flagged"] and v["maps"] == 0


def blob_maps(n: int, corner_weight: float, seed: int = 0) -> torch.Tensor:
    """``n`` normalised 64x64 maps, each a blob (peak 1, a lesion) at a random place in a
    central body disc, plus a fixed bump of ``corner_weight`` near the top-left corner:
    secondary in every map."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    r, a = 18 * torch.rand(n, generator=g).sqrt(), 2 * math.pi * torch.rand(n, generator=g)
    cy, cx = (32 + r * a.sin())[:, None, None], (32 + r * a.cos())[:, None, None]
    blobs = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 72.0)
    bump = corner_weight * torch.exp(-((yy - 5) ** 2 + (xx - 5) ** 2) / 18.0)
    maps = blobs + bump
    return maps / maps.flatten(1).amax(dim=1)[:, None, None]


def test_fixed_location_lift_and_mirror_contrast_by_hand() -> None:
    # 20x20, corner squares of 4x4 (4% of the area); ones everywhere and 3 more in the
    # top-left square: that corner holds 64/448 of the energy, the others 16/448.
    m = torch.ones(20, 20)
    m[:4, :4] += 3
    f = fixed_location(m, 0.2)
    assert f["lift"]["top-left"] == pytest.approx(64 / 448 / 0.04)
    assert f["lift"]["bottom-right"] == pytest.approx(16 / 448 / 0.04)
    assert f["contrast"]["top-left"] == pytest.approx(4.0)  # vs top-right, its mirror
    assert f["contrast"]["top-right"] == pytest.approx(0.25)
    assert f["contrast"]["bottom-left"] == pytest.approx(1.0)
    assert f["peak_corner"] == "top-left"
    flat = fixed_location(torch.ones(20, 20), 0.2)
    assert flat["lift"] == pytest.approx(dict.fromkeys(M.CORNERS, 1.0))
    assert flat["peak_corner"] is None
    zero = fixed_location(torch.zeros(20, 20), 0.2)
    assert zero["lift"] == dict.fromkeys(M.CORNERS) and zero["peak_corner"] is None
    assert not dataset_verdict([[]], ShortcutRule(), zero)["flagged"]


def test_a_cue_in_both_mirror_corners_or_a_faint_one_is_not_a_fixed_location() -> None:
    rule = ShortcutRule()
    both = torch.ones(20, 20)
    both[:4, :4] += 3
    both[:4, -4:] += 3  # symmetric: like anatomy
    assert not dataset_verdict([[]], rule, fixed_location(both, 0.2))["flagged"]
    faint = torch.zeros(20, 20)
    faint[4:16, 4:16] = 1.0
    faint[:4, :4] = 0.05  # 10x its mirror (0.005), but a seventh of the average (0.36)
    faint[:4, -4:] = 0.005
    f = fixed_location(faint, 0.2)
    assert (
        f["contrast"]["top-left"] >= rule.fixed_contrast and f["lift"]["top-left"] < rule.fixed_lift
    )
    assert not dataset_verdict([[]], rule, f)["flagged"]


def peak_flags(maps: torch.Tensor, rule: ShortcutRule) -> list[list[str]]:
    """Per-map flags from the peaks only (no body: nothing is outside it)."""
    body = torch.ones(maps.shape, dtype=torch.bool)
    area = torch.zeros(len(maps))
    share = M.out_of_body_share(maps, body)
    return image_flags(share, area, M.peak_corner(maps, rule.corner_band), rule)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_secondary_cue_in_one_corner_of_every_map_is_flagged_at_the_dataset_level(
    seed: int,
) -> None:
    rule = ShortcutRule()
    maps = blob_maps(64, corner_weight=0.2, seed=seed)
    flags = peak_flags(maps, rule)
    # The per-image peaks rest on the blobs: on their own they flag nothing.
    assert not dataset_verdict(flags, rule)["flagged"]
    v = dataset_verdict(flags, rule, fixed_location(maps.mean(dim=0), rule.corner_band))
    assert v["flagged"] and v["corner"] == "top-left"
    assert v["causes"] == ["fixed_location:top-left"]
    assert v["fixed_location"]["lift"]["top-left"] >= rule.fixed_lift
    assert v["fixed_location"]["contrast"]["top-left"] >= rule.fixed_contrast
    assert "denser in the top-left corner than in the top-right one" in v["reasons"][0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blobs_anywhere_without_a_fixed_cue_are_not_flagged(seed: int) -> None:
    rule = ShortcutRule()
    maps = blob_maps(64, corner_weight=0.0, seed=seed)
    fixed = fixed_location(maps.mean(dim=0), rule.corner_band)
    v = dataset_verdict(peak_flags(maps, rule), rule, fixed)
    assert not v["flagged"] and v["causes"] == [] and v["corner"] is None
    assert max(fixed["lift"].values()) < rule.fixed_lift


@pytest.mark.parametrize(
    "field,value",
    [("corner_band", 0.7), ("dataset_share", 0.0), ("fixed_lift", 0.0), ("fixed_contrast", 0.5)],
)
def test_bad_rule_values_are_refused_in_one_line(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"audit.shortcut.{field}={value}"):
        ShortcutRule(**{field: value})
