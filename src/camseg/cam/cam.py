"""Class activation maps (Zhou et al. 2016) for a GAP + linear classifier.

``CAM_k = sum_c w_kc F_c`` for every class at once, from one forward of the
encoder: no hook, no backward, no per-class loop. For such a model
``CAM_k.mean(hw) + b_k == logit_k``, so the logits come for free as well.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from camseg.cam.base import CamMethod, eval_mode
from camseg.errors import ConfigError


class CAM(CamMethod):
    """Plain CAM from ``model.features(x)`` and ``model.classifier`` (an ``nn.Linear``).

    Args:
        model: anything with ``features(x) -> (B,C,h,w)`` and a ``classifier``
            ``nn.Linear(C, K)`` applied to the spatial mean of the features
            (:class:`camseg.models.classifier.CamClassifier`).
        relu: False returns the raw signed maps (whose spatial mean plus the bias
            is the logit), True the ReLU'd maps the rest of the engine expects.
    """

    name = "cam"

    def __init__(self, model: nn.Module, relu: bool = True) -> None:
        super().__init__(model)
        if not callable(getattr(model, "features", None)) or not isinstance(
            getattr(model, "classifier", None), nn.Linear
        ):
            raise ConfigError(
                f"cam.method=cam: {type(model).__name__} has no features(x) and nn.Linear "
                "classifier (GAP + linear head); use a CamClassifier, or cam.method=gradcam"
            )
        self.relu = relu

    def compute(self, images: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        cams, _ = self.cams_and_logits(images)
        return cams

    def cams_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cams (B,K,h,w) float32, logits (B,K) float32) from one encoder forward.

        The maps are computed in float32 even under autocast: the features are cast
        before the contraction, which costs nothing next to the encoder.
        """
        head: nn.Linear = self.model.classifier  # type: ignore[assignment]
        with eval_mode(self.model), torch.no_grad():
            feats = self.model.features(images)  # type: ignore[operator]
            with torch.autocast(device_type=feats.device.type, enabled=False):
                weight = head.weight.float()
                cams = torch.einsum("bchw,kc->bkhw", feats.float(), weight)
                logits = cams.mean(dim=(2, 3))
                if head.bias is not None:
                    logits = logits + head.bias.float()
        return (cams.relu() if self.relu else cams), logits

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "target_layer": "features", "relu": self.relu}
