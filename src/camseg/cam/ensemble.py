"""Fusion of several CAM methods' normalised maps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from camseg.cam.base import CamMethod, normalize_cams
from camseg.errors import ConfigError

FUSIONS = ("mean", "max", "weighted")


class Ensemble(CamMethod):
    """Fuse the per-method normalised maps, resized to the largest map's size.

    Args:
        methods: the CAM methods (they may differ in target layer and resolution).
        fusion: ``mean``, ``max`` or ``weighted`` (weights normalised to sum to 1).
        weights: one non-negative weight per method, for ``weighted``.

    Returns maps in [0,1] (not re-normalised: a mean of maps that disagree stays
    below 1, which is information the policy's thresholds can use).
    """

    name = "ensemble"

    def __init__(
        self,
        methods: Sequence[CamMethod],
        fusion: str = "mean",
        weights: Sequence[float] | None = None,
    ) -> None:
        if not methods:
            raise ConfigError("cam.methods: an ensemble needs at least one method")
        if fusion not in FUSIONS:
            raise ConfigError(f"cam.fusion='{fusion}': use one of {list(FUSIONS)}")
        if fusion == "weighted":
            if weights is None or len(weights) != len(methods):
                raise ConfigError(
                    f"cam.weights={None if weights is None else list(weights)}: fusion=weighted "
                    f"needs one weight per method ({len(methods)})"
                )
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ConfigError(
                    f"cam.weights={list(weights)}: weights must be >= 0 with a positive sum"
                )
        super().__init__(methods[0].model)
        self.methods = list(methods)
        self.fusion = fusion
        self.weights = None if weights is None else [float(w) / sum(weights) for w in weights]

    def compute(self, images: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        maps = [normalize_cams(m.compute(images, present).float()) for m in self.methods]
        size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        maps = [
            m
            if m.shape[-2:] == size
            else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            for m in maps
        ]
        stacked = torch.stack(maps)
        if self.fusion == "max":
            return stacked.amax(dim=0)
        if self.fusion == "weighted":
            assert self.weights is not None
            w = torch.tensor(self.weights, device=stacked.device, dtype=stacked.dtype)
            return torch.einsum("m,m...->...", w, stacked)
        return stacked.mean(dim=0)

    @property
    def needs_gradients(self) -> bool:
        return any(m.needs_gradients for m in self.methods)

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "fusion": self.fusion,
            "weights": self.weights,
            "methods": [m.describe() for m in self.methods],
        }
