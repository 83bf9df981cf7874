"""Albumentations pipelines from config, applied to image and mask together."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from camseg.errors import ConfigError


def build_transforms(
    image_size: int | Sequence[int],
    augmentations: Sequence[Any] | None = None,
    seed: int | None = None,
) -> A.Compose:
    """``Resize(image_size)`` followed by the configured augmentations.

    Albumentations resizes masks with nearest-neighbour interpolation and applies every
    geometric transform to image and mask alike, so masks stay aligned with their image.

    Args:
        image_size: side length, or (height, width).
        augmentations: albumentations transforms, or configs with ``_target_`` to instantiate.
        seed: seeds the random augmentations (albumentations keeps its own generator, which
            ``seed_everything`` does not reach; DataLoader workers derive theirs from it).

    Raises:
        ConfigError: a size that is not positive, or an entry that does not build a transform.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if int(h) <= 0 or int(w) <= 0:
        raise ConfigError(f"data.image_size={image_size}: must be a positive size in pixels")
    steps: list[Any] = [A.Resize(height=int(h), width=int(w))]
    for i, aug in enumerate(augmentations or []):
        steps.append(_build_one(i, aug))
    return A.Compose(steps, seed=seed)


def _build_one(i: int, aug: Any) -> Any:
    where = f"data.train_transforms[{i}]"
    if isinstance(aug, DictConfig | Mapping):
        node = aug if isinstance(aug, DictConfig) else OmegaConf.create(dict(aug))
        target = node.get("_target_")
        if not target:
            raise ConfigError(
                f"{where}: no _target_; write e.g. {{_target_: albumentations.HorizontalFlip, p: 0.5}}"
            )
        try:
            # Plain lists and dicts as arguments: albumentations validates them with pydantic.
            aug = instantiate(node, _convert_="all")
        except InstantiationException as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{where}: cannot build {target} ({first})") from None
    if not isinstance(aug, A.BasicTransform | A.BaseCompose):
        raise ConfigError(
            f"{where}: {type(aug).__name__} is not an albumentations transform; use a _target_ from albumentations"
        )
    return aug
