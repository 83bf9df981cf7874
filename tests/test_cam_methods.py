"""CAM methods: the CAM/logit identity, Grad-CAM vs CAM, batch independence, fusion, factory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hydra import compose, initialize_config_dir
from torch import nn

from camseg.cam import (
    CAM,
    CAM_METHODS,
    Ensemble,
    GradCAM,
    GradCAMPlusPlus,
    LayerCAM,
    MultiScaleCAM,
    ScoreCAM,
    build_cam_method,
    normalize_cams,
)
from camseg.errors import ConfigError
from camseg.models.classifier import CamClassifier
from camseg.pseudo.stage import build_engine

CONF = Path(__file__).resolve().parents[1] / "conf"


class TinyCamNet(nn.Module):
    """A CAM-compatible classifier small enough for Score-CAM's C masked forwards."""

    def __init__(self, in_channels: int = 1, width: int = 6, num_classes: int = 3) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


@pytest.fixture
def resnet() -> CamClassifier:
    torch.manual_seed(0)
    model = CamClassifier(num_classes=3, backbone="resnet18", in_channels=1)
    return model.eval()


@pytest.fixture
def tiny() -> TinyCamNet:
    torch.manual_seed(0)
    return TinyCamNet().eval()


LABELS = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]])


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_raw_cam_mean_plus_bias_equals_logits(source: str) -> None:
    torch.manual_seed(0)
    model = CamClassifier(num_classes=4, backbone="resnet18", source=source, in_channels=1)
    x = torch.randn(3, 1, 96, 64)
    model.train()  # CAM must switch to eval itself, and restore train afterwards
    cams, logits = CAM(model, relu=False).cams_and_logits(x)
    raw = CAM(model, relu=False)(x)
    assert model.training
    with torch.no_grad():
        expected = model.eval()(x)
    bias = model.classifier.bias
    torch.testing.assert_close(raw.mean(dim=(2, 3)) + bias, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(cams, raw)
    assert (CAM(model)(x) == raw.relu()).all()


def test_cam_refuses_models_without_gap_linear_head() -> None:
    with pytest.raises(ConfigError, match=r"features.*gradcam"):
        CAM(torchvision.models.resnet18(num_classes=3))


def test_gradcam_at_last_layer_is_cam_over_hw(resnet: CamClassifier) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 1, 128, 96)
    cam = CAM(resnet)(x)
    grad = GradCAM(resnet)(x)  # labels=None: all classes
    h, w = cam.shape[-2:]
    # GAP + linear: d logit_k / dF = w_k / (hw) everywhere, so Grad-CAM = relu(CAM) / hw.
    torch.testing.assert_close(grad, cam / (h * w), atol=1e-6, rtol=1e-4)
    nonzero = cam.amax(dim=(2, 3)) > 0
    assert nonzero.any()
    diff = (normalize_cams(grad) - normalize_cams(cam)).abs().amax(dim=(2, 3))
    assert diff[nonzero].max() < 1e-5


def test_gradient_methods_zero_absent_classes(resnet: CamClassifier) -> None:
    x = torch.randn(3, 1, 64, 64)
    for method in (GradCAM(resnet), GradCAMPlusPlus(resnet), LayerCAM(resnet)):
        cams = method(x, LABELS)
        assert cams.shape == (3, 3, 2, 2)
        assert (cams >= 0).all()
        assert (cams[~LABELS.bool()] == 0).all()


def test_methods_work_under_inference_mode(resnet: CamClassifier, tiny: TinyCamNet) -> None:
    # Lightning's predict loop runs under torch.inference_mode, with inference tensors.
    x = torch.randn(2, 1, 32, 32)
    methods = (
        GradCAM(resnet),
        MultiScaleCAM(LayerCAM(resnet), scales=(1.0, 0.5)),
        ScoreCAM(tiny, batch_size=8),
    )
    for method in methods:
        expected = method(x, LABELS[:2])
        with torch.inference_mode():
            got = method(x.clone(), LABELS[:2])
        torch.testing.assert_close(got, expected)
        assert all(p.requires_grad for p in method.model.parameters())


def test_gradient_methods_work_on_plain_torchvision_models() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    method = GradCAM(model)
    assert method.target_layer == "layer4"
    cams = method(torch.randn(2, 3, 64, 64), LABELS[:2])
    assert cams.shape == (2, 3, 2, 2)


def _tiny_or_resnet(name: str, resnet: CamClassifier, tiny: TinyCamNet):
    if name == "scorecam":
        return ScoreCAM(tiny, batch_size=5)
    if name == "tta-cam":
        return MultiScaleCAM(CAM(resnet), scales=(1.0, 0.5), flip=True)
    if name == "tta-gradcam":
        return MultiScaleCAM(GradCAM(resnet), scales=(1.0, 1.5), flip=True)
    return build_cam_method(name, resnet)


@pytest.mark.parametrize(
    "name", ["cam", "gradcam", "gradcam++", "layercam", "scorecam", "tta-cam", "tta-gradcam"]
)
def test_batch_gives_the_same_maps_as_single_images(
    name: str, resnet: CamClassifier, tiny: TinyCamNet
) -> None:
    torch.manual_seed(2)
    method = _tiny_or_resnet(name, resnet, tiny)
    x = torch.randn(3, 1, 64, 64)
    batched = method(x, LABELS)
    singles = torch.cat([method(x[i : i + 1], LABELS[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=1e-4)


def test_scorecam_weights_are_masked_input_scores(tiny: TinyCamNet) -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 1, 32, 32)
    multiclass = ScoreCAM(tiny, batch_size=4, multilabel=False)(x)
    with torch.no_grad():
        act = tiny.features(x)  # ends in a ReLU: every term of the sum is >= 0
    # Softmax weights sum to 1 over classes and activations are >= 0, so the ReLU is a
    # no-op and the class maps sum to the channel sum of the activation.
    torch.testing.assert_close(multiclass.sum(dim=1), act.sum(dim=1), atol=1e-5, rtol=1e-5)
    # Independent Score-CAM of one image and class: mask the input channel by channel.
    b, k = 1, 0
    weights = []
    for ch in range(act.shape[1]):
        m = F.interpolate(act[b : b + 1, ch : ch + 1], size=(32, 32), mode="bilinear")
        m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-8)
        with torch.no_grad():
            weights.append(tiny(x[b : b + 1] * m).sigmoid()[0, k])
    manual = torch.einsum("c,chw->hw", torch.stack(weights), act[b]).relu()
    got = ScoreCAM(tiny, batch_size=7, multilabel=True)(x)[b, k]
    torch.testing.assert_close(got, manual, atol=1e-5, rtol=1e-5)


def test_ensemble_of_identical_methods_is_that_methods_normalised_map(
    resnet: CamClassifier,
) -> None:
    x = torch.randn(2, 1, 64, 64)
    expected = normalize_cams(GradCAM(resnet)(x, LABELS[:2]))
    for fusion, weights in (("mean", None), ("max", None), ("weighted", [1.0, 3.0])):
        fused = Ensemble([GradCAM(resnet), GradCAM(resnet)], fusion=fusion, weights=weights)
        torch.testing.assert_close(fused(x, LABELS[:2]), expected)


def test_ensemble_fuses_across_resolutions(resnet: CamClassifier) -> None:
    x = torch.randn(1, 1, 64, 64)
    coarse = CAM(resnet)
    fine = GradCAM(resnet, target_layer="encoder.body.6")  # stride 16
    fused = Ensemble([coarse, fine], fusion="weighted", weights=[1.0, 1.0])(x)
    a = F.interpolate(normalize_cams(coarse(x)), size=(4, 4), mode="bilinear")
    b = normalize_cams(fine(x))
    torch.testing.assert_close(fused, (a + b) / 2)


def test_ensemble_validates_its_options(resnet: CamClassifier) -> None:
    with pytest.raises(ConfigError, match="fusion='median'"):
        Ensemble([CAM(resnet)], fusion="median")
    with pytest.raises(ConfigError, match="one weight per method"):
        Ensemble([CAM(resnet), CAM(resnet)], fusion="weighted", weights=[1.0])
    with pytest.raises(ConfigError, match="positive sum"):
        Ensemble([CAM(resnet)], fusion="weighted", weights=[0.0])
    with pytest.raises(ConfigError, match="at least one"):
        Ensemble([])


def test_factory_builds_every_name_and_wraps_tta(resnet: CamClassifier) -> None:
    for name, cls in CAM_METHODS.items():
        assert type(build_cam_method(name, resnet, multilabel=False)) is cls
    tta = build_cam_method("gradcam", resnet, scales=[1.0, 0.5], flip=True)
    assert isinstance(tta, MultiScaleCAM) and isinstance(tta.method, GradCAM)
    assert tta.describe() == {
        "method": "gradcam",
        "target_layer": "encoder.body.7.1",
        "scales": [1.0, 0.5],
        "flip": True,
        "size_divisor": 1,
    }
    ens = build_cam_method("ensemble", resnet, methods=["cam", {"name": "layercam"}])
    assert isinstance(ens, Ensemble)
    assert [type(m) for m in ens.methods] == [CAM, LayerCAM]


def test_factory_errors_name_the_problem(resnet: CamClassifier) -> None:
    with pytest.raises(ConfigError, match=r"cam.method='gradcam3'.*gradcam\+\+"):
        build_cam_method("gradcam3", resnet)
    with pytest.raises(ConfigError, match=r"'cam' does not take \['target_layer'\]"):
        build_cam_method("cam", resnet, target_layer="encoder")
    with pytest.raises(ConfigError, match="needs a list of methods"):
        build_cam_method("ensemble", resnet)


@pytest.mark.parametrize("name", [*CAM_METHODS, "ensemble"])
def test_manifest_says_what_ran_for_every_registered_name(name: str, resnet: CamClassifier) -> None:
    # The real cam config group; gradcampp (an alias) used to be recorded as a
    # hook-free CAM on "features" and run under inference mode.
    override = "cam=ensemble" if name == "ensemble" else f"cam.method={name}"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[override])
    engine, desc = build_engine(cfg, resnet, multilabel=True)
    assert isinstance(engine, MultiScaleCAM)
    assert desc == {**engine.describe(), "image_size": cfg.data.image_size}
    ran = engine.method.methods if isinstance(engine.method, Ensemble) else [engine.method]
    described = desc["methods"] if name == "ensemble" else [desc]
    for method, record in zip(ran, described, strict=True):
        assert record["method"] == method.name
        assert record["target_layer"] == (
            "encoder.body.7.1" if method.takes_target_layer else "features"
        )
    if name != "ensemble":
        assert type(ran[0]) is CAM_METHODS[name]
    assert engine.needs_gradients == any(
        type(m) in (GradCAM, GradCAMPlusPlus, LayerCAM) for m in ran
    )
