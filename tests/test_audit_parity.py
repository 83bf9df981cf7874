"""Parity with pytorch-grad-cam's metrics on a fixed small model and input (bench extra).

Deletion/insertion: pytorch-grad-cam has no AUC of its own, but its percentile
perturbations (``RemoveMostRelevantFirst`` / ``RemoveLeastRelevantFirst`` with an imputer
that puts 0 in place of removed pixels) give every inner point of the curves; the end
points are the plain and the all-baseline image. Stated tolerance: 1e-5 absolute on every
curve point, AUC, confidence drop; the "increase" indicator equal.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from camseg.audit.faithfulness import class_scores, confidence_change, deletion_insertion

gc_metrics = pytest.importorskip("pytorch_grad_cam.metrics.cam_mult_image")
pc = pytest.importorskip("pytorch_grad_cam.metrics.perturbation_confidence")
targets_mod = pytest.importorskip("pytorch_grad_cam.utils.model_targets")

TOL = 1e-5
STEPS = 8


def fixed_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 3, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).eval()


def fixed_input() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 1, 16, 16, generator=g)
    cams = torch.rand(4, 16, 16, generator=g)  # continuous: no ties in the ranking
    targets = torch.tensor([0, 1, 2, 1])
    return images, cams, targets


def zero_imputer(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return tensor * keep


def gradcam_curves(model: nn.Module, images, cams, targets) -> tuple[np.ndarray, np.ndarray]:
    softmax = [targets_mod.ClassifierOutputSoftmaxTarget(int(t)) for t in targets]
    with torch.no_grad():
        full = model(images).softmax(1)[torch.arange(len(targets)), targets].numpy()
        empty = model(torch.zeros_like(images)).softmax(1)[torch.arange(len(targets)), targets]
    deletion, insertion = [full], [empty.numpy()]
    for s in range(1, STEPS):
        f = s / STEPS
        for curve, cls, q in (
            (deletion, pc.RemoveMostRelevantFirst, 100 * (1 - f)),
            (insertion, pc.RemoveLeastRelevantFirst, 100 * f),
        ):
            metric = pc.PerturbationConfidenceMetric(cls(q, zero_imputer))
            curve.append(metric(images, cams.numpy(), softmax, model, return_diff=False))
    deletion.append(empty.numpy())
    insertion.append(full)
    return np.stack(deletion, 1), np.stack(insertion, 1)


def test_deletion_and_insertion_match_pytorch_grad_cam_perturbations() -> None:
    model = fixed_model()
    images, cams, targets = fixed_input()
    ours = deletion_insertion(model, images, cams, targets, class_scores(False), STEPS)
    deletion, insertion = gradcam_curves(model, images, cams, targets)
    assert np.abs(ours.deletion.numpy() - deletion).max() < TOL
    assert np.abs(ours.insertion.numpy() - insertion).max() < TOL
    x = np.linspace(0, 1, STEPS + 1)
    assert np.abs(ours.deletion_auc.numpy() - np.trapezoid(deletion, x, axis=1)).max() < TOL
    assert np.abs(ours.insertion_auc.numpy() - np.trapezoid(insertion, x, axis=1)).max() < TOL


def test_confidence_drop_and_increase_match_pytorch_grad_cam() -> None:
    model = fixed_model()
    images, cams, targets = fixed_input()
    softmax = [targets_mod.ClassifierOutputSoftmaxTarget(int(t)) for t in targets]
    drop = gc_metrics.DropInConfidence()(images, cams.numpy(), softmax, model)
    increase = gc_metrics.IncreaseInConfidence()(images, cams.numpy(), softmax, model)
    ours = confidence_change(model, images, cams, targets, class_scores(False))
    assert np.abs(ours.drop.numpy() - drop).max() < TOL
    assert (ours.increase.numpy() == increase).all()
    assert 0 < increase.sum() < len(increase) or drop.max() > 0  # a non-trivial case
