"""Pixel quantities of the pseudo-mask policy are relative to the image: one recipe, any size.

The CRF's kernel widths are fractions of the image side, ``min_component_size`` a fraction
of its area. The shipped recipes were converted so that on their own source images (the
size the CRF and the clean-up run at: the image's original size) they keep the pixel values
they had before.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from camseg.cam import CRFConfig, PseudoMaskPolicy
from camseg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

# experiment -> (its source images' side in px, the pixel values of its recipe before the
# change: gaussian_sxy, bilateral_sxy, min_component_size; None where it has no CRF)
RECIPES_IN_PIXELS = {
    "synthetic": (128, (3, 40), 0),  # data.synthetic.size
    "lgg_mri": (256, (3, 40), 0),  # lgg-mri-40 slices
    "hemorrhage": (512, (3, 40), 20),  # CT-ICH slices
    "realistic_hemorrhage": (512, (3, 40), 20),  # data.synthetic.size
    "nodule": (512, None, 8),  # LIDC slices
}


@pytest.mark.parametrize("experiment", sorted(RECIPES_IN_PIXELS))
def test_shipped_recipes_keep_their_pixel_values_at_their_own_size(experiment: str) -> None:
    side, crf_px, min_px = RECIPES_IN_PIXELS[experiment]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"])
    if experiment in ("synthetic", "realistic_hemorrhage"):
        assert cfg.data.synthetic.size == side
    p = cfg.pseudo
    assert float(p.min_component_size) * side * side == min_px
    if crf_px is None:
        assert p.crf is None
        return
    crf = p.crf if p.crf is not None else p.affinity.seeds.crf  # lgg_mri: its seeds' CRF
    assert (crf.gaussian_sxy * side, crf.bilateral_sxy * side) == crf_px
    policy = PseudoMaskPolicy(min_component_size=p.min_component_size)  # accepted as it is
    assert policy.min_component_size == p.min_component_size


@pytest.mark.parametrize("field", ["gaussian_sxy", "bilateral_sxy"])
def test_a_kernel_width_in_pixels_is_refused_with_the_conversion(field: str) -> None:
    with pytest.raises(ConfigError, match=f"pseudo.crf.{field}=40: a fraction of the image side"):
        CRFConfig(**{field: 40})


def _scene(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A bright disc on a dark image and a blurred, too large CAM of it, drawn at ``size`` px."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r = ((yy - 0.45 * size) ** 2 + (xx - 0.55 * size) ** 2).sqrt() / size
    image = torch.where(r < 0.18, 200.0, 40.0)[None, None]
    cam = (1 - r / 0.4).clamp(0, 1)[None, None]  # wider than the disc, soft edge
    return image, cam


def test_crf_pseudo_masks_agree_across_resolutions() -> None:
    """The same scene at 64 px and 128 px gives the same mask (compared at 64 px) with one
    relative recipe."""
    pytest.importorskip("pydensecrf.densecrf")
    config = CRFConfig(gaussian_sxy=3 / 64, bilateral_sxy=20 / 64, bg_power=0.5)
    policy = PseudoMaskPolicy(fg_threshold=0.5, bg_threshold=0.3, crf=config)
    labels = torch.tensor([[1]])
    masks = {}
    for size in (64, 128):
        image, cam = _scene(size)
        masks[size] = policy(cam, labels, image)
    down = F.interpolate(masks[128][None].float(), size=(64, 64), mode="nearest")[0].to(torch.uint8)
    agree = float((down == masks[64]).float().mean())
    assert agree > 0.97


def test_crf_kernel_widths_reach_the_library_in_pixels_of_the_image(monkeypatch) -> None:
    """A spy on pydensecrf's bilateral kernel: 0.15625 of a 128 px side is 20 px, of 64 px 10 px."""
    pytest.importorskip("pydensecrf.densecrf")
    from camseg.cam import crf as crf_module

    _, utils = crf_module.import_densecrf()
    seen: list[tuple[float, float]] = []
    real = utils.create_pairwise_bilateral

    def spy(sdims, schan, img, chdim):  # type: ignore[no-untyped-def]
        seen.append(tuple(sdims))
        return real(sdims=sdims, schan=schan, img=img, chdim=chdim)

    monkeypatch.setattr(utils, "create_pairwise_bilateral", spy)
    policy = PseudoMaskPolicy(crf=CRFConfig(bilateral_sxy=0.15625, iterations=1))
    for size in (128, 64):
        image, cam = _scene(size)
        policy(cam, torch.tensor([[1]]), image)
    assert seen == [(20.0, 20.0), (10.0, 10.0)]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "pseudo.min_component_size=20",
            "pseudo.min_component_size=20: a fraction of the image area",
        ),
        (
            "pseudo.crf.bilateral_sxy=40",
            "pseudo.crf.bilateral_sxy=40.0: a fraction of the image side",
        ),
        ("pseudo.calibrate=yes", "pseudo.calibrate=yes: use true, false or auto"),
        ("pseudo.calibration.fg_thresholds=[2]", "pseudo.calibration.fg_thresholds: 2.0 is not in"),
    ],
)
def test_preflight_refuses_pixels_before_stage_one(override: str, message: str) -> None:
    from camseg.preflight import check_config

    extra = ["pseudo.calibrate=true"] if "calibration." in override else []
    if override.startswith("pseudo.crf."):
        extra.append("pseudo=crf")  # the LGG recipe refines by affinity; its CRF variant
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=lgg_mri", override, *extra])
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        check_config(cfg)
    assert "\n" not in str(info.value)
