"""Grad-CAM, Grad-CAM++ and LayerCAM: one small class each, over a shared loop.

The shared loop runs one forward with the target layer captured, then one
gradient pass per class *present in the batch* (classes are looped, images are
batched): the score backpropagated for class k is ``sum_b logit_bk * present_bk``,
so each image only receives gradients of its own present classes, and the maps of
absent classes are zeros. Each subclass overrides :meth:`combine` only.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import nn

from camseg.cam.base import CamMethod, check_classes
from camseg.cam.layers import ActivationsAndGrads, default_target_layer, resolve_target_layer


class GradientCamMethod(CamMethod):
    """Base of the gradient-weighted methods.

    Works on any ``nn.Module`` whose forward returns logits (B,K), given a target
    layer name from ``model.named_modules()`` that outputs (B,C,h,w).

    Args:
        model: the classifier.
        target_layer: module name; None picks :func:`default_target_layer`.
    """

    name = "gradient"
    gradients = True
    takes_target_layer = True

    def __init__(self, model: nn.Module, target_layer: str | None = None) -> None:
        super().__init__(model)
        self.target_layer = target_layer if target_layer else default_target_layer(model)
        resolve_target_layer(model, self.target_layer)

    @abstractmethod
    def combine(self, activation: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """(B,C,h,w) activation and gradient of one class -> (B,h,w) map before ReLU."""

    def compute(self, images: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        # Lightning's predict loop runs under inference_mode, where autograd is off
        # and its tensors cannot enter a graph: switch it off here, and clone the input.
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            ActivationsAndGrads(self.model, self.target_layer) as ag,
        ):
            x = images.clone() if images.is_inference() else images
            logits = ag.forward(x).float()
            activation = ag.activation
            assert activation is not None
            batch, num_classes = logits.shape
            check_classes(present, num_classes)
            mask = (torch.ones_like(logits, dtype=torch.bool) if present is None else present).to(
                logits.device
            )
            # One host sync per batch to learn which classes need a gradient pass.
            classes = mask.any(dim=0).nonzero().flatten().tolist()
            act = activation.detach().float()
            cams = act.new_zeros(batch, num_classes, *act.shape[-2:])
            weights = mask.to(logits.dtype)
            for i, k in enumerate(classes):
                score = (logits[:, k] * weights[:, k]).sum()
                grad = ag.gradient(score, retain_graph=i < len(classes) - 1).float()
                cams[:, k] = self.combine(act, grad).relu()
        return cams

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "target_layer": self.target_layer}


class GradCAM(GradientCamMethod):
    """Selvaraju et al. 2017: channel weights = spatial mean of the gradients."""

    name = "gradcam"

    def combine(self, activation: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        weights = grad.mean(dim=(2, 3))
        return torch.einsum("bc,bchw->bhw", weights, activation)


class GradCAMPlusPlus(GradientCamMethod):
    """Chattopadhay et al. 2018: pixel-wise weighted positive gradients.

    Uses the usual closed form with the exponential-score approximation
    (higher derivatives as powers of the first one), as pytorch-grad-cam does.
    """

    name = "gradcam++"
    aliases = ("gradcampp",)

    def combine(self, activation: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        grad2 = grad.pow(2)
        grad3 = grad2 * grad
        total = activation.sum(dim=(2, 3), keepdim=True)
        denom = 2 * grad2 + total * grad3
        # Guard by exact zero rather than an additive eps: gradients of a GAP head
        # are O(w / hw) and an eps would bias their square.
        alpha = torch.where(denom != 0, grad2 / torch.where(denom != 0, denom, 1.0), 0.0)
        weights = (alpha * grad.relu()).sum(dim=(2, 3))
        return torch.einsum("bc,bchw->bhw", weights, activation)


class LayerCAM(GradientCamMethod):
    """Jiang et al. 2021: activation weighted by its positive gradient, per pixel."""

    name = "layercam"

    def combine(self, activation: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return (grad.relu() * activation).sum(dim=1)
