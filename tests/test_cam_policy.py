"""Pseudo-mask policy: foreground, background, ignore band, clean-up, validation."""

from __future__ import annotations

import pytest
import torch

from camseg.cam import CRFConfig, PseudoMaskPolicy, remove_small_components, threshold_cams
from camseg.errors import ConfigError


def _cams() -> torch.Tensor:
    """Image 0: class 1 has a 0.9 square, a 0.1 band, 0.01 elsewhere; class 2 absent but
    strong; class 3 weak. Image 1: the same maps, no class present."""
    c = torch.full((2, 3, 16, 16), 0.01)
    c[:, 0, 2:12, 2:12] = 0.1
    c[:, 0, 4:8, 4:8] = 0.9
    c[:, 1] = 1.0  # absent in image 0: must never become foreground
    c[:, 2, 12:, 12:] = 0.2
    return c


def test_regions_follow_the_thresholds() -> None:
    labels = torch.tensor([[1, 0, 1], [0, 0, 0]])
    mask = PseudoMaskPolicy(fg_threshold=0.3, bg_threshold=0.05)(_cams(), labels)
    assert mask.dtype == torch.uint8 and mask.shape == (2, 16, 16)
    m = mask[0]
    assert set(m.unique().tolist()) == {0, 1, 255}
    assert (m[4:8, 4:8] == 1).all() and (m == 1).sum() == 16
    band = torch.zeros(16, 16, dtype=torch.bool)
    band[2:12, 2:12] = True
    band[4:8, 4:8] = False
    assert (m[band] == 255).all()
    assert (m[12:, 12:] == 255).all()  # class 3 at 0.2: ignore band
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[2:12, 2:12] = False
    outside[12:, 12:] = False
    assert (m[outside] == 0).all()
    assert (mask[1] == 0).all()  # negative image: all background


def test_two_present_classes_take_the_argmax() -> None:
    cams = torch.zeros(1, 2, 4, 4)
    cams[0, 0, :, :2] = 0.8
    cams[0, 1, :, :2] = 0.5
    cams[0, 1, :, 2:] = 0.6
    cams[0, 0, :, 2:] = 0.4
    mask = PseudoMaskPolicy()(cams, torch.tensor([[1, 1]]))
    assert (mask[0, :, :2] == 1).all() and (mask[0, :, 2:] == 2).all()


def test_absent_class_never_foreground_even_when_strongest() -> None:
    cams = torch.ones(1, 2, 4, 4)
    cams[0, 0] = 0.02
    mask = PseudoMaskPolicy()(cams, torch.tensor([[1.0, 0.0]]))
    assert (mask == 0).all()


def test_threshold_edges_are_inclusive_for_foreground() -> None:
    cams = torch.tensor([[[[0.3, 0.2999, 0.05, 0.0499]]]])
    mask = threshold_cams(cams, torch.tensor([[True]]), fg_threshold=0.3, bg_threshold=0.05)
    assert mask.flatten().tolist() == [1, 255, 255, 0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fg_threshold": 1.5}, r"pseudo.fg_threshold=1.5: must be in \[0, 1\]"),
        ({"bg_threshold": -0.1}, r"pseudo.bg_threshold=-0.1: must be in \[0, 1\]"),
        (
            {"fg_threshold": 0.2, "bg_threshold": 0.4},
            "pseudo.bg_threshold=0.4 > pseudo.fg_threshold=0.2: bg_threshold must be <= fg",
        ),
        ({"min_component_size": -3}, "pseudo.min_component_size=-3"),
        ({"min_component_size": 20}, "pseudo.min_component_size=20: a fraction of the image area"),
        ({"threshold_rule": "otsu"}, "pseudo.threshold_rule='otsu': choose one of"),
        ({"crf": {"iterations": 0}}, "pseudo.crf.iterations=0"),
    ],
)
def test_invalid_settings_are_one_line_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        PseudoMaskPolicy(**kwargs)
    assert "\n" not in str(info.value)


def test_small_components_become_ignore_not_background() -> None:
    cams = torch.zeros(2, 2, 12, 12)
    cams[0, 0, 0:2, 0:2] = 1.0  # 4 px blob of class 1: removed
    cams[0, 0, 5:10, 5:10] = 1.0  # 25 px blob of class 1: kept
    cams[0, 1, 0:3, 9:12] = 1.0  # 9 px blob of class 2: kept
    cams[1, 0, 0:2, 0:3] = 1.0  # 6 px in the other image: removed (no bridging across images)
    labels = torch.tensor([[1, 1], [1, 0]])
    policy = PseudoMaskPolicy(fg_threshold=0.5, bg_threshold=0.1, min_component_size=8 / 144)
    mask = policy(cams, labels)
    assert (mask[0, 0:2, 0:2] == 255).all()
    assert (mask[0, 5:10, 5:10] == 1).all()
    assert (mask[0, 0:3, 9:12] == 2).all()
    assert (mask[1, 0:2, 0:3] == 255).all()
    assert ((mask == 0) | (mask == 255) | (mask == 1) | (mask == 2)).all()
    plain = PseudoMaskPolicy(fg_threshold=0.5, bg_threshold=0.1)(cams, labels)
    changed = plain != mask
    assert (plain[changed] == 1).all() and (mask[changed] == 255).all()


def test_components_are_per_class_and_eight_connected() -> None:
    mask = torch.zeros(1, 6, 6, dtype=torch.uint8)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 2, 2] = 1  # diagonal: one 3 px component
    mask[0, 3:5, 3:5] = 2  # touches class 1 diagonally but is its own 4 px component
    out = remove_small_components(mask, min_fraction=4 / 36)
    assert (out[0, 3:5, 3:5] == 2).all()
    assert out[0, 0, 0] == out[0, 1, 1] == out[0, 2, 2] == 255
    assert (remove_small_components(mask, min_fraction=3 / 36) == mask).all()


def test_min_component_size_is_relative_to_the_image_area() -> None:
    """The same blob, at 12 px and at twice the resolution, meets the same fate."""
    small = torch.zeros(1, 12, 12, dtype=torch.uint8)
    small[0, 2:4, 2:5] = 1  # 6 px = 4.2 % of the image
    large = small.repeat_interleave(2, 1).repeat_interleave(2, 2)  # 24 px of 576
    for fraction, kept in ((0.05, False), (0.04, True)):
        for mask in (small, large):
            out = remove_small_components(mask, min_fraction=fraction)
            assert bool((out == 1).any()) is kept, (fraction, mask.shape)


def test_policy_accepts_crf_settings_as_mapping_or_flag() -> None:
    pytest.importorskip("pydensecrf.densecrf")
    assert PseudoMaskPolicy(crf={"iterations": 3}).crf == CRFConfig(iterations=3)
    assert PseudoMaskPolicy(crf=True).crf == CRFConfig()
    assert PseudoMaskPolicy(crf=False).crf is None
    described = PseudoMaskPolicy(crf=True).describe()
    assert described["crf"]["iterations"] == CRFConfig().iterations


def test_max_fraction_rule_thresholds_each_image_by_its_own_maximum() -> None:
    cams = torch.zeros(2, 1, 1, 4)
    cams[0, 0, 0] = torch.tensor([0.5, 0.3, 0.2, 0.01])  # maximum 0.5
    cams[1, 0, 0] = torch.tensor([1.0, 0.6, 0.4, 0.01])  # maximum 1.0
    policy = PseudoMaskPolicy(fg_threshold=0.5, bg_threshold=0.1, threshold_rule="max_fraction")
    mask = policy(cams, torch.tensor([[1], [1]]))
    # fg >= 0.25 / 0.5, bg < 0.05 / 0.1
    assert mask[0, 0].tolist() == [1, 1, 255, 0]
    assert mask[1, 0].tolist() == [1, 1, 255, 0]
    absolute = PseudoMaskPolicy(fg_threshold=0.5, bg_threshold=0.1)(cams, torch.tensor([[1], [1]]))
    assert absolute[0, 0].tolist() == [1, 255, 255, 0]


def test_mass_quantile_rule_by_hand() -> None:
    """Values 4,3,2,1 (mass 10): the 0.3 quantile is 2 (1+2 = 30 % of the mass), the 0.1 one 1."""
    cams = torch.tensor([[[[0.4, 0.3, 0.2, 0.1]]]])
    policy = PseudoMaskPolicy(fg_threshold=0.3, bg_threshold=0.1, threshold_rule="mass_quantile")
    assert policy(cams, torch.tensor([[1]]))[0, 0].tolist() == [1, 1, 1, 255]
    policy = PseudoMaskPolicy(fg_threshold=0.7, bg_threshold=0.35, threshold_rule="mass_quantile")
    # 0.7 quantile: 1+2+3 = 60 % < 70 %, so 4; 0.35 quantile: 3
    assert policy(cams, torch.tensor([[1]]))[0, 0].tolist() == [1, 255, 0, 0]


def test_mass_quantile_of_an_empty_map_reads_as_absolute() -> None:
    cams = torch.zeros(1, 1, 3, 3)
    policy = PseudoMaskPolicy(fg_threshold=0.3, bg_threshold=0.1, threshold_rule="mass_quantile")
    assert (policy(cams, torch.tensor([[1]])) == 0).all()


def test_per_class_thresholds_pick_the_largest_qualifying_class() -> None:
    cams = torch.tensor([[[[0.6, 0.2]], [[0.5, 0.25]]]])  # (1,2,1,2)
    present = torch.tensor([[True, True]])
    fg = torch.tensor([[0.7, 0.2]])  # class 1 must reach 0.7, class 2 only 0.2
    bg = torch.tensor([[0.1, 0.1]])
    assert threshold_cams(cams, present, fg, bg)[0, 0].tolist() == [2, 2]
    assert threshold_cams(cams, present, 0.3, 0.1)[0, 0].tolist() == [1, 255]
