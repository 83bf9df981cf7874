"""Dense-CRF refinement snaps a blurry CAM to the object's edges."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from camseg.cam import CRFConfig, PseudoMaskPolicy, crf_refine
from camseg.errors import ConfigError

H = W = 64


def _toy() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A bright square on a dark noisy image, and a CAM blurred and larger than it."""
    torch.manual_seed(0)
    image = torch.full((1, 1, H, W), 40.0)
    image[0, 0, 20:40, 24:44] = 200.0
    image = (image + 5 * torch.randn_like(image)).clamp(0, 255)
    square = torch.zeros(H, W, dtype=torch.bool)
    square[20:40, 24:44] = True
    cam = torch.zeros(1, 1, H, W)
    cam[0, 0, 16:44, 20:48] = 1.0
    kernel = torch.exp(-(torch.arange(-12, 13.0) ** 2) / (2 * 5.0**2))
    kernel = kernel / kernel.sum()
    cam = F.conv2d(cam, kernel.view(1, 1, 1, -1), padding=(0, 12))
    cam = F.conv2d(cam, kernel.view(1, 1, -1, 1), padding=(12, 0))
    return image, cam / cam.max(), square


def _iou(mask: torch.Tensor, square: torch.Tensor) -> float:
    fg = mask[0] == 1
    return float((fg & square).sum() / (fg | square).sum())


@pytest.mark.parametrize("as_uint8", [True, False])
def test_crf_aligns_the_mask_with_the_object(as_uint8: bool) -> None:
    pytest.importorskip("pydensecrf.densecrf")
    image, cam, square = _toy()
    labels = torch.tensor([[1]])
    plain = PseudoMaskPolicy(fg_threshold=0.3, bg_threshold=0.05)(cam, labels)
    refined_policy = PseudoMaskPolicy(fg_threshold=0.3, bg_threshold=0.05, crf=CRFConfig())
    refined = refined_policy(cam, labels, image.to(torch.uint8) if as_uint8 else image / 255)
    assert set(refined.unique().tolist()) <= {0, 1, 255}
    assert _iou(refined, square) > _iou(plain, square) + 0.2
    assert _iou(refined, square) > 0.9


def test_crf_keeps_negatives_and_absent_classes_empty() -> None:
    pytest.importorskip("pydensecrf.densecrf")
    image, cam, _ = _toy()
    cams = torch.cat([cam, cam], dim=1).repeat(2, 1, 1, 1)
    present = torch.tensor([[True, False], [False, False]])
    probs = crf_refine(cams, present, image.repeat(2, 1, 1, 1), CRFConfig(iterations=3))
    assert probs.shape == cams.shape
    assert (probs[0, 1] == 0).all() and (probs[1] == 0).all()
    assert probs.min() >= 0 and probs.max() <= 1 and probs[0, 0].max() > 0.9


def test_crf_needs_images_of_the_same_size() -> None:
    pytest.importorskip("pydensecrf.densecrf")
    _, cam, _ = _toy()
    policy = PseudoMaskPolicy(crf=True)
    with pytest.raises(ValueError, match="needs the images"):
        policy(cam, torch.tensor([[1]]))
    with pytest.raises(ValueError, match="CAMs' size"):
        policy(cam, torch.tensor([[1]]), torch.zeros(1, 1, 32, 32))


def test_missing_pydensecrf_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(ConfigError, match="pip install pydensecrf2"):
        PseudoMaskPolicy(crf=True)
    assert PseudoMaskPolicy(crf=None).crf is None
