"""Stage-1 CAM regularisers: zero for models that satisfy them, positive for one that does
not, trained through ClassifierModule without breaking the CAM identity."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from functools import partial

import pytest
import torch
from torch import nn

from camseg.cam.cam import CAM
from camseg.cls.module import ClassifierModule
from camseg.cls.regularisers import (
    check_regulariser,
    equivariance_loss,
    puzzle_loss,
    regulariser_loss,
)
from camseg.errors import ConfigError
from camseg.models.classifier import CamClassifier


class _FeatureNet(nn.Module):
    """A CAM model whose features (B,C,H/4,W/4) come from ``make(x)``; GAP + Linear head."""

    def __init__(self, make, channels: int = 3, classes: int = 2) -> None:
        super().__init__()
        self.make = make
        self.classifier = nn.Linear(channels, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.make(x)


def _constant(x: torch.Tensor) -> torch.Tensor:
    b, _, h, w = x.shape
    return torch.ones(b, 3, h // 4, w // 4) * torch.tensor([1.0, 2.0, 0.5])[:, None, None]


def _column_ramp(x: torch.Tensor) -> torch.Tensor:
    """Features that grow left to right: a horizontal flip changes them."""
    b, _, h, w = x.shape
    ramp = torch.linspace(0, 1, w // 4).expand(b, 3, h // 4, w // 4)
    return ramp.contiguous()


def _pooled(x: torch.Tensor) -> torch.Tensor:
    """Every cell holds the image's global mean colour: the same on tiles only if they agree."""
    b, c, h, w = x.shape
    return x.mean(dim=(2, 3))[:, :, None, None].expand(b, c, h // 4, w // 4)


pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny tensors gain nothing from threads; on a loaded 2-core machine they cost a lot.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def classifier() -> CamClassifier:
    torch.manual_seed(0)
    return CamClassifier(2, "resnet10t", "timm", 3, 16)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_regularisers_vanish_for_a_constant_model(images: torch.Tensor) -> None:
    net = _FeatureNet(_constant)
    nn.init.uniform_(net.classifier.weight, 0.1, 1.0)  # positive CAMs: the ReLU keeps them
    assert float(equivariance_loss(net, images)) == 0.0
    consistency, _ = puzzle_loss(net, images, torch.ones(2, 2), nn.BCEWithLogitsLoss())
    assert float(consistency) == 0.0


def test_regularisers_see_a_model_that_breaks_them(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    ramp = _FeatureNet(_column_ramp)
    nn.init.uniform_(ramp.classifier.weight, 0.1, 1.0)
    assert float(equivariance_loss(ramp, images)) > 0.05
    pooled = _FeatureNet(_pooled)
    nn.init.uniform_(pooled.classifier.weight, 0.1, 1.0)
    split = images.clone()
    split[:, :, :16] = 0.0  # the top tiles are dark, the bottom ones bright
    consistency, _ = puzzle_loss(pooled, split, torch.ones(2, 2), nn.BCEWithLogitsLoss())
    assert float(consistency) > 0.05


def test_puzzle_tiles_loss_is_the_classification_loss_of_the_reassembled_features(
    images: torch.Tensor,
) -> None:
    net = _FeatureNet(_pooled)
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    _, tiles = puzzle_loss(net, images, targets, nn.BCEWithLogitsLoss())
    # Independently: each tile's features are its own mean colour; the reassembled map
    # pools to the mean of the four tile means.
    means = torch.stack(
        [images[..., i : i + 16, j : j + 16].mean(dim=(2, 3)) for i in (0, 16) for j in (0, 16)]
    ).mean(dim=0)
    expected = nn.functional.binary_cross_entropy_with_logits(net.classifier(means), targets)
    assert float(tiles) == pytest.approx(float(expected), rel=1e-5)


def test_bad_regulariser_settings_are_config_errors() -> None:
    assert check_regulariser(None, 1.0) is None
    with pytest.raises(ConfigError, match=r"model\.regulariser=seam"):
        check_regulariser("seam", 1.0)
    with pytest.raises(ConfigError, match="regulariser_weight"):
        check_regulariser("puzzle", -1.0)


@pytest.mark.parametrize("name", ["equivariance", "puzzle"])
def test_cam_identity_holds_after_training_with_the_regulariser(
    name: str, classifier: CamClassifier
) -> None:
    net = copy.deepcopy(classifier)
    module = ClassifierModule(
        net,
        partial(torch.optim.SGD, lr=0.05),
        ["a", "b"],
        regulariser=name,
        regulariser_weight=1.0,
    )
    opt = module.configure_optimizers()
    x = torch.rand(4, 3, 32, 32)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    before = [p.detach().clone() for p in net.parameters()]
    module.log = lambda *a, **k: None  # type: ignore[method-assign]  # no trainer attached
    for _ in range(1):
        opt.zero_grad()
        loss = module.training_step({"image": x, "labels": labels}, 0)
        reg = regulariser_loss(name, net, x, labels, module.loss_fn)
        assert float(reg) > 0 and loss.requires_grad
        loss.backward()
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    net.eval()
    with torch.no_grad():
        cams, _ = CAM(net, relu=False).cams_and_logits(x)
        logits = net(x)
    torch.testing.assert_close(cams.mean(dim=(2, 3)) + net.classifier.bias, logits)
