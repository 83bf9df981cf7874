"""Score-CAM (Wang et al. 2020): channels weighted by the score of the masked input."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from camseg.cam.base import CamMethod, check_classes, eval_mode
from camseg.cam.layers import ActivationsAndGrads, default_target_layer, resolve_target_layer
from camseg.errors import ConfigError


class ScoreCAM(CamMethod):
    """Gradient-free: every activation channel, upsampled and scaled to [0,1], masks
    the input; the class probability of the masked input is that channel's weight.

    The (image, channel) pairs are flattened and forwarded in chunks of
    ``batch_size`` masked images, so memory stays bounded by the chunk, never by
    B x C full-size masks. All classes come from the same forwards.

    Args:
        model: any classifier returning logits (B,K).
        target_layer: module name; None picks :func:`default_target_layer`.
        batch_size: masked images per forward.
        multilabel: sigmoid scores (multi-label model) or softmax (multi-class).
    """

    name = "scorecam"
    takes_target_layer = True

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | None = None,
        batch_size: int = 64,
        multilabel: bool = True,
    ) -> None:
        super().__init__(model)
        if batch_size < 1:
            raise ConfigError(f"cam.batch_size={batch_size}: must be >= 1")
        self.target_layer = target_layer if target_layer else default_target_layer(model)
        resolve_target_layer(model, self.target_layer)
        self.batch_size = batch_size
        self.multilabel = multilabel

    def compute(self, images: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        with (
            torch.no_grad(),
            ActivationsAndGrads(self.model, self.target_layer, need_grads=False) as ag,
        ):
            logits = ag.forward(images)
            assert ag.activation is not None
            act = ag.activation.float()
        check_classes(present, logits.shape[1])
        batch, channels, h, w = act.shape
        size = images.shape[-2:]
        flat = act.reshape(batch * channels, 1, h, w)
        owner = torch.arange(batch, device=images.device).repeat_interleave(channels)
        scores = []
        with eval_mode(self.model), torch.no_grad():
            for start in range(0, batch * channels, self.batch_size):
                stop = min(start + self.batch_size, batch * channels)
                up = F.interpolate(
                    flat[start:stop], size=size, mode="bilinear", align_corners=False
                )
                low = up.amin(dim=(2, 3), keepdim=True)
                high = up.amax(dim=(2, 3), keepdim=True)
                masks = (up - low) / (high - low).clamp_min(1e-8)
                out = self.model(images[owner[start:stop]] * masks.to(images.dtype)).float()
                scores.append(out.sigmoid() if self.multilabel else out.softmax(dim=1))
        weights = torch.cat(scores).reshape(batch, channels, -1)
        return torch.einsum("bck,bchw->bkhw", weights, act).relu()

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "target_layer": self.target_layer,
            "multilabel": self.multilabel,
        }
