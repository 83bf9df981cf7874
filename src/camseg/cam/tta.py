"""Multi-scale + flip test-time augmentation of any CAM method (the IRN recipe)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from camseg.cam.base import CamMethod, normalize_cams
from camseg.errors import ConfigError

MIN_SIZE = 8


class MultiScaleCAM(CamMethod):
    """``(B,C,H,W) -> (B,K,H,W) in [0,1]``: sum of per-view ReLU'd maps at the input size.

    Per scale, the whole batch is resized once (bilinear, ``align_corners=False``)
    and, with ``flip``, concatenated with its mirror image, so one scale costs one
    forward of 2B images. The mirrored half is un-flipped and added to the plain half
    at the feature resolution (resizing is linear and commutes with the flip, so
    adding before the one resize per scale is the same sum), then resized to (H,W).
    The sum over scales is normalised per image and class by its maximum; classes
    absent from ``labels`` are zeroed.

    Args:
        method: the CAM method run on every view.
        scales: resize factors of the input.
        flip: also run the horizontally flipped views.
        size_divisor: round scaled sizes to multiples of this (models that need
            e.g. multiples of 32); sizes are never below 8 pixels.
    """

    name = "multiscale"

    def __init__(
        self,
        method: CamMethod,
        scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0),
        flip: bool = True,
        size_divisor: int = 1,
    ) -> None:
        if not scales or any(s <= 0 for s in scales):
            raise ConfigError(f"cam.scales={list(scales)}: need at least one scale, all > 0")
        if size_divisor < 1:
            raise ConfigError(f"cam.size_divisor={size_divisor}: must be >= 1")
        super().__init__(method.model)
        self.method = method
        self.scales = tuple(float(s) for s in scales)
        self.flip = flip
        self.size_divisor = size_divisor

    def scaled_size(self, height: int, width: int, scale: float) -> tuple[int, int]:
        """(h, w) of one view: rounded to the divisor, at least max(8, divisor)."""
        d = self.size_divisor
        low = max(MIN_SIZE, d)
        return (
            max(low, round(height * scale / d) * d),
            max(low, round(width * scale / d) * d),
        )

    def compute(self, images: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        batch, _, height, width = images.shape
        view_labels = None
        if present is not None:
            view_labels = torch.cat([present, present]) if self.flip else present
        total: torch.Tensor | None = None
        for scale in self.scales:
            size = self.scaled_size(height, width, scale)
            x = images
            if size != (height, width):
                x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            if self.flip:
                x = torch.cat([x, x.flip(-1)])
            cams = self.method.compute(x, view_labels).float().relu()
            if self.flip:
                cams = cams[:batch] + cams[batch:].flip(-1)
            cams = F.interpolate(cams, size=(height, width), mode="bilinear", align_corners=False)
            total = cams if total is None else total + cams
        assert total is not None
        if present is not None:
            total = total * present[:, :, None, None].to(total.dtype)
        return normalize_cams(total)

    @property
    def needs_gradients(self) -> bool:
        return self.method.needs_gradients

    def describe(self) -> dict[str, Any]:
        return {
            **self.method.describe(),
            "scales": list(self.scales),
            "flip": self.flip,
            "size_divisor": self.size_divisor,
        }
