"""Albumentations pipelines from config, applied to image and mask together."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf


def build_transforms(image_size: int | Sequence[int], augmentations: Sequence[Any] | None = None) -> A.Compose:
    """``Resize(image_size)`` followed by the configured augmentations.

    Args:
        image_size: side length, or (height, width).
        augmentations: albumentations transforms, or configs with ``_target_`` to instantiate.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    steps: list[Any] = [A.Resize(height=int(h), width=int(w))]
    for aug in augmentations or []:
        if isinstance(aug, DictConfig | dict):
            aug = instantiate(OmegaConf.create(aug) if isinstance(aug, dict) else aug)
        elif isinstance(aug, ListConfig):
            raise TypeError("augmentation entries must be transforms or dicts with _target_")
        steps.append(aug)
    return A.Compose(steps)
