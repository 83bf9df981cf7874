"""Segmentation losses: every name builds, ignored pixels are really ignored, no NaN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from camseg.errors import ConfigError
from camseg.seg.losses import LOSS_NAMES, SoftmaxFocalLoss, build_loss

IGNORE = 255


def _data(
    k: int, seed: int, b: int = 2, h: int = 8, w: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k + 1, h, w, generator=gen)
    target = torch.randint(0, k + 1, (b, h, w), generator=gen)
    return logits, target


def _loss_and_grad(loss: torch.nn.Module, logits: torch.Tensor, target: torch.Tensor):
    x = logits.clone().requires_grad_(True)
    value = loss(x, target)
    value.backward()
    return value.detach(), x.grad


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_loss_builds_and_backprops(name: str, k: int) -> None:
    logits, target = _data(k, seed=0)
    target[:, :2] = IGNORE
    value, grad = _loss_and_grad(build_loss(name, num_classes=k), logits, target)
    assert value.ndim == 0 and torch.isfinite(value) and value > 0
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_unknown_name_lists_the_names() -> None:
    with pytest.raises(ConfigError, match=r"seg\.loss\.name='bce'.*dice_ce, ce, dice, focal"):
        build_loss("bce", num_classes=2)


def test_bad_class_weights_and_shapes_raise() -> None:
    with pytest.raises(ConfigError, match="class_weights has 2 values; give 3"):
        build_loss("ce", num_classes=2, class_weights=[1.0, 2.0])
    logits, target = _data(2, seed=0)
    with pytest.raises(ValueError, match="do not match"):
        build_loss("ce", num_classes=2)(logits, target[:, :4])
    with pytest.raises(ValueError, match="with K=3"):
        build_loss("dice_ce", num_classes=3)(logits, target)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_changing_logits_at_ignored_pixels_changes_nothing(name: str) -> None:
    logits, target = _data(2, seed=1)
    ignore = torch.rand(target.shape, generator=torch.Generator().manual_seed(9)) < 0.3
    target[ignore] = IGNORE
    other = logits.clone()
    other[ignore.unsqueeze(1).expand_as(other)] = 50.0 * torch.randn(int(ignore.sum()) * 3)
    loss = build_loss(name, num_classes=2)
    v1, g1 = _loss_and_grad(loss, logits, target)
    v2, g2 = _loss_and_grad(loss, other, target)
    torch.testing.assert_close(v1, v2)
    torch.testing.assert_close(g1, g2)
    mask = ignore.unsqueeze(1).expand_as(g1)
    assert (g1[mask] == 0).all()
    assert (g1[~mask] != 0).any()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_ignored_band_equals_cropping_it_away(name: str) -> None:
    # Batch-level losses sum over valid pixels: ignoring columns is the same as cropping them.
    logits, target = _data(2, seed=2)
    target[..., 6:] = IGNORE
    loss = build_loss(name, num_classes=2)
    torch.testing.assert_close(
        loss(logits, target), loss(logits[..., :6].contiguous(), target[..., :6].contiguous())
    )


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_all_ignored_batch_gives_zero_loss_and_zero_grad(name: str) -> None:
    logits, target = _data(2, seed=3)
    target.fill_(IGNORE)
    value, grad = _loss_and_grad(build_loss(name, num_classes=2), logits, target)
    assert value.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def test_ce_equals_torch_ce_on_valid_pixels_with_and_without_weights() -> None:
    logits, target = _data(2, seed=4)
    target[0, :3] = IGNORE
    valid = target != IGNORE
    flat_logits = logits.permute(0, 2, 3, 1)[valid]  # (N, K+1)
    flat_target = target[valid]
    expected = F.cross_entropy(flat_logits, flat_target)
    torch.testing.assert_close(build_loss("ce", num_classes=2)(logits, target), expected)
    w = [0.5, 2.0, 3.0]
    expected_w = F.cross_entropy(flat_logits, flat_target, weight=torch.tensor(w))
    torch.testing.assert_close(
        build_loss("ce", num_classes=2, class_weights=w)(logits, target), expected_w
    )


def test_focal_matches_its_formula_and_reduces_to_ce_at_gamma_zero() -> None:
    logits, target = _data(2, seed=5)
    target[1] = IGNORE
    valid = target != IGNORE
    p = logits.softmax(1).permute(0, 2, 3, 1)[valid]
    pt = p.gather(1, target[valid].unsqueeze(1)).squeeze(1)
    expected = (-((1 - pt) ** 2) * pt.log()).mean()
    torch.testing.assert_close(build_loss("focal", num_classes=2)(logits, target), expected)
    ce = build_loss("ce", num_classes=2)(logits, target)
    torch.testing.assert_close(SoftmaxFocalLoss(IGNORE, gamma=0.0)(logits, target), ce)
    with pytest.raises(ConfigError, match="gamma=-1"):
        build_loss("focal", num_classes=2, gamma=-1)


def test_focal_with_small_gamma_has_finite_gradients() -> None:
    logits, target = _data(2, seed=6)
    target[:, :4] = IGNORE
    logits[0, 1] = 60.0  # p_t == 1 exactly where the target is 1
    target[0, 4:] = 1
    _, grad = _loss_and_grad(build_loss("focal", num_classes=2, gamma=0.5), logits, target)
    assert torch.isfinite(grad).all()


def test_dice_ce_is_the_weighted_sum_of_its_components() -> None:
    logits, target = _data(3, seed=7)
    target[:, -1] = IGNORE
    loss = build_loss("dice_ce", num_classes=3, dice_weight=0.3, ce_weight=2.0)
    parts = loss.components(logits, target)
    assert set(parts) == {"dice", "ce"}
    torch.testing.assert_close(loss(logits, target), 0.3 * parts["dice"] + 2.0 * parts["ce"])
    torch.testing.assert_close(parts["ce"], build_loss("ce", num_classes=3)(logits, target))
    torch.testing.assert_close(parts["dice"], build_loss("dice", num_classes=3)(logits, target))


def test_dice_without_background_ignores_channel_zero() -> None:
    logits, target = _data(2, seed=8)
    target.zero_()  # a negative image: only background
    assert build_loss("dice", num_classes=2)(logits, target) > 0
    without_bg = build_loss("dice", num_classes=2, dice_include_background=False)
    assert without_bg(logits, target).item() == 0.0


def test_tversky_with_equal_weights_is_dice() -> None:
    logits, target = _data(2, seed=9)
    target[:, 0] = IGNORE
    torch.testing.assert_close(
        build_loss("tversky", num_classes=2, alpha=0.5, beta=0.5)(logits, target),
        build_loss("dice", num_classes=2)(logits, target),
    )


def test_lovasz_per_image_skips_all_ignored_images() -> None:
    logits, target = _data(2, seed=10, b=3)
    target[1] = IGNORE
    per_image = build_loss("lovasz", num_classes=2, lovasz_per_image=True)
    expected = (per_image(logits[:1], target[:1]) + per_image(logits[2:], target[2:])) / 2
    torch.testing.assert_close(per_image(logits, target), expected)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_half_precision_logits_give_a_float32_loss(name: str) -> None:
    # bf16-true training hands the loss bf16 logits outside autocast.
    logits, target = _data(2, seed=11)
    target[0, :3] = IGNORE
    loss = build_loss(name, num_classes=2)
    value, grad = _loss_and_grad(loss, logits.bfloat16(), target)
    assert value.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(value, loss(logits.bfloat16().float(), target))
