"""CAM regularisers for stage 1: losses added to the classification loss while training.

The classifier stays ``encoder -> GAP -> Linear``: the regularisers only change what the
encoder learns, so the CAM identity (spatial mean of CAM + bias = logit) holds as before.

* ``equivariance`` (SEAM-style): the CAM of a rescaled, flipped image should equal the
  rescaled, flipped CAM of the image; L1 between the two ReLU'd maps.
* ``puzzle`` (PuzzleCAM-style): the CAMs of the image's 2 x 2 tiles, reassembled, should
  equal the CAM of the whole image (L1), and the reassembled tile features should classify
  the image (the classification loss on their pooled logits).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from camseg.errors import ConfigError

REGULARISERS = ("equivariance", "puzzle")
EQUIVARIANCE_SCALE = 0.5


def check_regulariser(name: str | None, weight: float) -> str | None:
    """``model.regulariser`` as None or one of :data:`REGULARISERS`; one-line errors."""
    if name in (None, "", "null", "none"):
        return None
    if name not in REGULARISERS:
        raise ConfigError(f"model.regulariser={name}: use null or one of {list(REGULARISERS)}")
    if not weight >= 0:
        raise ConfigError(f"model.regulariser_weight={weight}: must be >= 0")
    return str(name)


def _cams(net: Any, features: torch.Tensor) -> torch.Tensor:
    """ReLU'd CAMs (B,K,h,w) of features (B,C,h,w) under the net's linear head.

    ``net``: a :class:`~camseg.models.classifier.CamClassifier` (or anything with
    ``features`` and a linear ``classifier``).
    """
    return torch.einsum("bchw,kc->bkhw", features, net.classifier.weight).relu()


def _flip_rescale(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False).flip(-1)


def equivariance_loss(
    net: Any, images: torch.Tensor, scale: float = EQUIVARIANCE_SCALE
) -> torch.Tensor:
    """``mean |CAM(T x) - T CAM(x)|`` for ``T`` = rescale by ``scale`` then horizontal flip.

    Zero for an exactly equivariant model (a constant one, for example).
    """
    h, w = images.shape[-2:]
    small = (max(1, round(h * scale)), max(1, round(w * scale)))
    cams = _cams(net, net.features(images))
    cams_t = _cams(net, net.features(_flip_rescale(images, small)))
    return (
        (cams_t - _flip_rescale(cams, (int(cams_t.shape[-2]), int(cams_t.shape[-1])))).abs().mean()
    )


def _tiles(images: torch.Tensor) -> torch.Tensor:
    """(B,C,H,W) -> (4B,C,H/2,W/2): top-left, top-right, bottom-left, bottom-right."""
    h, w = images.shape[-2:]
    hh, hw = h // 2, w // 2
    parts = [images[..., :hh, :hw], images[..., :hh, hw : 2 * hw], images[..., hh : 2 * hh, :hw]]
    parts.append(images[..., hh : 2 * hh, hw : 2 * hw])
    return torch.cat(parts, dim=0)


def _reassemble(features: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_tiles` on feature maps: (4B,C,h,w) -> (B,C,2h,2w)."""
    tl, tr, bl, br = features.chunk(4, dim=0)
    return torch.cat([torch.cat([tl, tr], dim=-1), torch.cat([bl, br], dim=-1)], dim=-2)


def puzzle_loss(
    net: Any,
    images: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CAM consistency ``mean |CAM(x) - reassembled CAM(tiles)|``, tiles' classification loss).

    The first term is zero for a model whose features are the same on tiles and whole.
    """
    full = net.features(images)
    pieces = _reassemble(net.features(_tiles(images)))
    if pieces.shape[-2:] != full.shape[-2:]:
        pieces = F.interpolate(pieces, size=full.shape[-2:], mode="bilinear", align_corners=False)
    consistency = (_cams(net, full) - _cams(net, pieces)).abs().mean()
    logits = net.classifier(pieces.mean(dim=(2, 3)))
    return consistency, loss_fn(logits, targets)


def regulariser_loss(
    name: str,
    net: Any,
    images: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The loss of regulariser ``name`` (see the module docstring)."""
    if name == "equivariance":
        return equivariance_loss(net, images)
    consistency, tiles = puzzle_loss(net, images, targets, loss_fn)
    return consistency + tiles
