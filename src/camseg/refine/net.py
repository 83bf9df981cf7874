"""The affinity network (AffinityNet / PSA style) and its loss.

Why this design: a light timm encoder (``resnet10t`` by default) with a 1x1 feature head
on three levels (strides s, 2s, 4s, merged at stride s = 4 by default), and affinity
``exp(-mean |f_i - f_j|)`` between cells. It is PSA's affinity branch without its
heavy ResNet-38; IRN's boundary + displacement heads would add instance machinery that
semantic pseudo-masks do not need. The network is rebuilt from typed keyword arguments
(:func:`affinity_kwargs`), never from a ``_target_`` stored in a checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from camseg.errors import ConfigError

STRIDES = (4, 8)
_KEYS = ("backbone", "in_channels", "pretrained", "feature_dim", "stride")


def affinity_kwargs(cfg: Mapping[str, Any], label: str) -> dict[str, Any]:
    """Checked keyword arguments of :class:`AffinityNet` from a config or checkpoint."""
    unknown = sorted(set(cfg) - set(_KEYS))
    if unknown:
        raise ConfigError(f"{label}: unknown affinity net keys {unknown}; allowed: {list(_KEYS)}")
    backbone = str(cfg.get("backbone", "resnet10t"))
    stride, feature_dim = int(cfg.get("stride", 4)), int(cfg.get("feature_dim", 32))
    in_channels = int(cfg.get("in_channels", 3))
    if stride not in STRIDES:
        raise ConfigError(f"{label}: stride={stride}: use one of {list(STRIDES)}")
    if feature_dim < 1 or in_channels < 1:
        raise ConfigError(f"{label}: feature_dim and in_channels must be >= 1")
    if not backbone.replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"{label}: backbone={backbone!r}: a timm model name")
    return {
        "backbone": backbone,
        "in_channels": in_channels,
        "pretrained": bool(cfg.get("pretrained", False)),
        "feature_dim": feature_dim,
        "stride": stride,
    }


class AffinityNet(nn.Module):
    """Images (B,C,H,W) -> affinity features (B,D,ceil(H/s),ceil(W/s)).

    Args:
        backbone: a timm model with ``features_only`` support.
        in_channels: input channels (as the classifier's).
        pretrained: timm's ImageNet weights (downloads; off in tests and the demo).
        feature_dim: D, channels of each level's 1x1 head and of the output.
        stride: s, the affinity grid's stride in pixels (4 or 8).
    """

    def __init__(
        self,
        backbone: str = "resnet10t",
        in_channels: int = 3,
        pretrained: bool = False,
        feature_dim: int = 32,
        stride: int = 4,
    ) -> None:
        super().__init__()
        import timm

        self.stride = stride
        try:
            probe = timm.create_model(backbone, features_only=True, pretrained=False)
        except Exception as e:  # unknown name, no features_only
            raise ConfigError(f"pseudo.affinity.backbone={backbone!r}: {e}") from None
        info: Any = probe.feature_info
        reductions = list(info.reduction())
        wanted = [i for i, r in enumerate(reductions) if r in (stride, 2 * stride, 4 * stride)]
        if len(wanted) < 2:
            raise ConfigError(
                f"pseudo.affinity.backbone={backbone!r}: needs feature levels at strides "
                f"{stride}, {2 * stride}, {4 * stride} (it has {reductions})"
            )
        try:
            self.encoder = timm.create_model(
                backbone,
                features_only=True,
                out_indices=wanted,
                pretrained=pretrained,
                in_chans=in_channels,
            )
        except Exception as e:  # offline download, missing weights
            raise ConfigError(
                f"pseudo.affinity.pretrained=true: cannot load {backbone} weights ({e}); "
                "set pseudo.affinity.pretrained=false"
            ) from None
        encoder_info: Any = self.encoder.feature_info
        channels = encoder_info.channels()
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, feature_dim, 1, bias=False), nn.GroupNorm(4, feature_dim), nn.ReLU()
            )
            for c in channels
        )
        self.merge = nn.Conv2d(feature_dim * len(channels), feature_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        size = (-(-h // self.stride), -(-w // self.stride))
        levels = [
            F.interpolate(head(f), size=size, mode="bilinear", align_corners=False)
            for head, f in zip(self.heads, self.encoder(x), strict=True)
        ]
        return self.merge(torch.cat(levels, dim=1))


def affinity_loss(
    affinity: torch.Tensor, targets: Mapping[str, torch.Tensor], eps: float = 1e-5
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PSA's balanced loss: ``bg_pos/4 + fg_pos/4 + neg/2``.

    Positives pull the affinity to 1 (``-log a``), negatives push it to 0
    (``-log(1 - a)``); each term is the mean over its own pairs (0 when it has none), so
    the many background pairs do not drown the few foreground ones.
    """
    a = affinity.clamp(eps, 1 - eps)
    parts = {}
    for key, value in (("bg_pos", -a.log()), ("fg_pos", -a.log()), ("neg", -(1 - a).log())):
        sel = targets[key]
        parts[key] = value[sel].mean() if bool(sel.any()) else affinity.new_zeros(())
    loss = parts["bg_pos"] / 4 + parts["fg_pos"] / 4 + parts["neg"] / 2
    return loss, parts
