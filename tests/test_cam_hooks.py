"""Hooks live only inside ActivationsAndGrads; target layers resolve by name."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from camseg.cam import (
    ActivationsAndGrads,
    GradCAM,
    LayerCAM,
    ScoreCAM,
    default_target_layer,
    resolve_target_layer,
)
from camseg.errors import ConfigError
from camseg.models.classifier import CamClassifier


@pytest.fixture
def model() -> CamClassifier:
    torch.manual_seed(0)
    return CamClassifier(num_classes=3, backbone="resnet18", in_channels=1)


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def test_hooks_removed_and_state_restored_after_use(model: CamClassifier) -> None:
    model.train()
    model.encoder.body[1].eval()  # a frozen BatchNorm inside a training model
    model.encoder.body[0].weight.requires_grad_(False)
    before = _hook_count(model)
    x = torch.randn(2, 1, 64, 64)
    labels = torch.tensor([[1, 0, 1], [0, 1, 1]])
    for method in (GradCAM(model), LayerCAM(model)):
        method(x, labels)
        assert _hook_count(model) == before
        assert model.training and model.encoder.body[2].training
        assert not model.encoder.body[1].training
        assert not model.encoder.body[0].weight.requires_grad
        assert model.classifier.weight.requires_grad
        # Gradients are taken w.r.t. the activation only: parameters get no .grad.
        assert all(p.grad is None for p in model.parameters())


def test_hooks_removed_and_state_restored_after_an_exception(model: CamClassifier) -> None:
    model.train()
    before = _hook_count(model)
    with (
        pytest.raises(RuntimeError, match="boom"),
        ActivationsAndGrads(model, "encoder.body.7") as ag,
    ):
        assert _hook_count(model) == before + 1
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
        ag.forward(torch.randn(1, 1, 64, 64))
        raise RuntimeError("boom")
    assert _hook_count(model) == before
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_exception_inside_the_forward_restores_too(model: CamClassifier) -> None:
    model.train()
    before = _hook_count(model)
    with pytest.raises(RuntimeError):
        GradCAM(model)(torch.randn(1, 3, 64, 64))  # wrong channel count: conv fails
    assert _hook_count(model) == before
    assert model.training


def test_activation_and_gradient_of_a_linear_head(model: CamClassifier) -> None:
    x = torch.randn(2, 1, 64, 64)
    with ActivationsAndGrads(model, "encoder.body.7") as ag:
        logits = ag.forward(x)
        grad = ag.gradient(logits[:, 1].sum())
        features = ag.activation
    assert features is not None and features.shape == (2, 512, 2, 2)
    # d logit_1 / dF = w_1 / (h w) at every position of every image.
    expected = (model.classifier.weight[1] / 4)[None, :, None, None].expand_as(grad)
    torch.testing.assert_close(grad, expected)
    with torch.no_grad():
        torch.testing.assert_close(features, model.eval().features(x))


def test_wrong_target_layer_lists_candidates(model: CamClassifier) -> None:
    with pytest.raises(ConfigError, match=r"target_layer='encoder.body.70'.*encoder\.body\.7"):
        GradCAM(model, target_layer="encoder.body.70")
    with pytest.raises(
        ConfigError, match=r"target_layer='nonsense'.*last module names.*classifier"
    ):
        resolve_target_layer(model, "nonsense")
    with pytest.raises(ConfigError, match="target_layer=''"):
        resolve_target_layer(model, "")  # the root module is not a layer
    # An empty name in a config means "the default layer".
    assert ScoreCAM(model, target_layer="").target_layer == "encoder.body.7.1"


def test_layer_run_twice_per_forward_is_refused(model: CamClassifier) -> None:
    # torchvision's BasicBlock calls its one ReLU module twice.
    with pytest.raises(ConfigError, match="ran 2 times"):
        GradCAM(model, target_layer="encoder.body.7.1.relu")(torch.randn(1, 1, 64, 64))


def test_default_target_layer_is_the_last_block() -> None:
    torch.manual_seed(0)
    tv = CamClassifier(num_classes=2, backbone="resnet18", in_channels=1)
    timm_model = CamClassifier(num_classes=2, backbone="resnet18", source="timm", in_channels=1)
    plain = torchvision.models.resnet18(num_classes=2)
    assert default_target_layer(tv) == "encoder.body.7.1"
    assert default_target_layer(timm_model) == "encoder.body.layer4.1"
    assert default_target_layer(plain) == "layer4"
    assert _hook_count(tv) == 0
