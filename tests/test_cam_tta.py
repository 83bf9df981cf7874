"""Multi-scale + flip test-time augmentation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from camseg.cam import CAM, GradCAM, MultiScaleCAM, normalize_cams
from camseg.errors import ConfigError
from camseg.models.classifier import CamClassifier

LABELS = torch.tensor([[1, 0, 1], [0, 1, 0]])


@pytest.fixture
def model() -> CamClassifier:
    torch.manual_seed(0)
    return CamClassifier(num_classes=3, backbone="resnet18", in_channels=1).eval()


def _one_view_at_a_time(model: CamClassifier, x: torch.Tensor, scales, labels) -> torch.Tensor:
    """IRN's way: every image, every scale, every flip through the model on its own."""
    h, w = x.shape[-2:]
    out = []
    for i in range(x.shape[0]):
        total = torch.zeros(1, labels.shape[1], h, w)
        for s in scales:
            size = (max(8, round(h * s)), max(8, round(w * s)))
            view = F.interpolate(x[i : i + 1], size=size, mode="bilinear", align_corners=False)
            for flipped in (False, True):
                v = view.flip(-1) if flipped else view
                with torch.no_grad():
                    cam = torch.einsum(
                        "bchw,kc->bkhw", model.features(v), model.classifier.weight
                    ).relu()
                cam = cam.flip(-1) if flipped else cam
                total += F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)
        out.append(total * labels[i, :, None, None])
    return normalize_cams(torch.cat(out))


def test_batched_tta_equals_one_view_at_a_time(model: CamClassifier) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 1, 80, 72)
    scales = (1.0, 0.5, 1.5, 2.0)
    got = MultiScaleCAM(CAM(model), scales=scales, flip=True)(x, LABELS)
    expected = _one_view_at_a_time(model, x, scales, LABELS)
    assert got.shape == (2, 3, 80, 72)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_output_is_normalised_and_absent_classes_are_zero(model: CamClassifier) -> None:
    x = torch.randn(2, 1, 64, 64)
    cams = MultiScaleCAM(GradCAM(model), scales=(1.0, 0.5))(x, LABELS)
    assert cams.min() >= 0 and cams.max() <= 1
    present = LABELS.bool()
    assert (cams[~present] == 0).all()
    peaks = cams.amax(dim=(2, 3))[present]
    assert torch.allclose(peaks[peaks > 0], torch.ones(1))
    everything = MultiScaleCAM(CAM(model), scales=(1.0,), flip=False)(x)  # labels None: all classes
    single = F.interpolate(CAM(model)(x), size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(everything, normalize_cams(single))


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_flip_tta_is_flip_equivariant(model: CamClassifier, method: str) -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 1, 64, 48)
    base = CAM(model) if method == "cam" else GradCAM(model)
    tta = MultiScaleCAM(base, scales=(1.0, 0.75, 1.5), flip=True)
    torch.testing.assert_close(tta(x, LABELS), tta(x.flip(-1), LABELS).flip(-1), atol=1e-5, rtol=0)


def test_scaled_sizes_are_rounded_and_bounded(model: CamClassifier) -> None:
    tta = MultiScaleCAM(CAM(model), scales=(0.01, 0.5, 1.3))
    assert tta.scaled_size(100, 60, 0.01) == (8, 8)
    assert tta.scaled_size(100, 60, 1.3) == (130, 78)
    by32 = MultiScaleCAM(CAM(model), size_divisor=32)
    assert by32.scaled_size(100, 60, 1.0) == (96, 64)
    assert by32.scaled_size(100, 60, 0.1) == (32, 32)


def test_bad_scales_are_config_errors(model: CamClassifier) -> None:
    with pytest.raises(ConfigError, match=r"cam.scales=\[1.0, -0.5\]"):
        MultiScaleCAM(CAM(model), scales=(1.0, -0.5))
    with pytest.raises(ConfigError, match=r"cam\.scales"):
        MultiScaleCAM(CAM(model), scales=())


def test_autocast_bf16_stays_close_to_float32(model: CamClassifier) -> None:
    torch.manual_seed(3)
    x = torch.randn(1, 1, 64, 64)
    tta = MultiScaleCAM(CAM(model), scales=(1.0, 2.0))
    full = tta(x, LABELS[:1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = tta(x, LABELS[:1])
    assert half.dtype == torch.float32
    assert (half - full).abs().max() < 0.1
