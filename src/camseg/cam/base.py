"""The interface every CAM method shares, and the helpers they have in common."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn


class CamMethod(ABC):
    """``(images (B,C,H,W), labels (B,K) 0/1 or None) -> cams (B,K,h,w) >= 0``.

    Maps are *raw*: ReLU'd but not normalised (see :func:`normalize_cams`), at the
    resolution the method works at (the target layer's feature map); the test-time
    augmentation wrapper :class:`~camseg.cam.tta.MultiScaleCAM` resizes and normalises.
    ``labels=None`` means every class. Gradient-based methods only backpropagate the
    classes present in ``labels``, so absent classes come back as zeros; plain CAM and
    Score-CAM compute every class anyway.

    A plain class rather than an ``nn.Module``: the classifier is held by reference, so
    that a LightningModule owning both never registers its weights twice.
    """

    # Read by the registry (factory.CAM_METHODS), stage 2 and the manifest: config names
    # (``name`` is the one recorded), backpropagation (no inference mode), target layer.
    name: ClassVar[str] = "cam"
    aliases: ClassVar[tuple[str, ...]] = ()
    gradients: ClassVar[bool] = False
    takes_target_layer: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"images must be (B,C,H,W), got shape {tuple(images.shape)}")
        present = None
        if labels is not None:
            present = present_mask(labels, images.shape[0]).to(images.device)
        return self.compute(images, present)

    @abstractmethod
    def compute(self, images: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        """Raw maps (B,K,h,w) >= 0; ``present`` is a (B,K) bool mask or None (all classes)."""

    @property
    def needs_gradients(self) -> bool:
        """Whether running this method (with its members, for wrappers) backpropagates."""
        return self.gradients

    def describe(self) -> dict[str, Any]:
        """What a manifest records about this method."""
        return {"method": self.name}


def present_mask(labels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B,K) labels of any dtype (0/1, bool, probabilities) -> (B,K) bool."""
    if labels.ndim != 2 or labels.shape[0] != batch_size:
        raise ValueError(
            f"labels must be (B,K) with B={batch_size} like the images, got {tuple(labels.shape)}"
        )
    if labels.dtype == torch.bool:
        return labels
    return labels > 0.5


def check_classes(present: torch.Tensor | None, num_classes: int) -> None:
    """Refuse labels whose class count differs from the model's."""
    if present is not None and present.shape[1] != num_classes:
        raise ValueError(
            f"labels have {present.shape[1]} classes but the model predicts {num_classes}"
        )


def normalize_cams(cams: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Divide each (image, class) map by its spatial maximum: (...,h,w) >= 0 -> [0,1].

    All-zero maps stay zero; the maximum is clamped to ``eps`` so that the division
    never produces NaN. Expects ReLU'd maps.
    """
    peak = cams.amax(dim=(-2, -1), keepdim=True).clamp_min(eps)
    return cams / peak


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore every submodule's own flag afterwards.

    Per-module restore matters: a model training with frozen BatchNorm layers has
    some submodules in eval mode on purpose.
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, training in modes:
            module.training = training
