"""CamClassifier: encoder -> feature map -> global average pooling -> one linear layer.

Nothing sits between the pooled features and the logits, so for every class k

    logit_k = mean_hw( sum_c w_kc F_c ) + b_k,

which makes the model CAM-compatible by construction: the CAM engine reads
``features(x)`` and ``classifier`` directly, without hooks.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from camseg.checkpoints import CheckpointError, classifier_kwargs
from camseg.constants import ENCODER_SOURCES as SOURCES
from camseg.constants import OUTPUT_STRIDES
from camseg.errors import CamsegError, ConfigError
from camseg.models.hub import hub_endpoint, hub_reachable, looks_offline, offline_error
from camseg.models.local_weights import is_local_weights, load_local_weights
from camseg.models.trunks import EncoderTrunk, SmpTrunk, TimmTrunk, TorchvisionTrunk

__all__ = [
    "OUTPUT_STRIDES",
    "SOURCES",
    "CamClassifier",
    "EncoderTrunk",
    "build_classifier",
    "build_encoder",
    "hub_reachable",
    "is_local_weights",
]


def build_encoder(
    backbone: str,
    source: str = "torchvision",
    in_channels: int = 3,
    output_stride: int = 32,
    pretrained: bool | str = False,
) -> EncoderTrunk:
    """Build a feature extractor by name with an ``out_channels`` attribute.

    Args:
        backbone: model name in its source library (``resnet18``, ``efficientnet_b0``,
            ``densenet121``, ``convnext_tiny``; smp: ``efficientnet-b0``, ``tu-convnext_tiny``, ...).
        source: ``torchvision``, ``timm`` or ``smp``.
        in_channels: input channels (1 for grayscale CT/MRI, 3 for RGB or stacked windows).
        output_stride: 32 (standard), 16 or 8 (last stage(s) unstrided: finer CAMs).
        pretrained: False for random init; True (the library's default set) or a weight-set
            name (torchvision ``IMAGENET1K_V1``, timm tag ``a1_in1k``, smp ``imagenet``) to
            download, which needs internet; or a path to a local checkpoint file to load
            (a bare encoder, a CamClassifier or a Lightning checkpoint).

    Raises:
        ConfigError: an unknown name, an impossible stride, or weights that cannot be had.
    """
    if source not in SOURCES:
        raise ConfigError(f"model.net.source='{source}': use one of {list(SOURCES)}")
    if output_stride not in OUTPUT_STRIDES:
        raise ConfigError(
            f"model.net.output_stride={output_stride}: use one of {list(OUTPUT_STRIDES)}"
        )
    if in_channels < 1:
        raise ConfigError(f"in_channels={in_channels}: need at least one input channel")
    local = is_local_weights(pretrained)
    download = bool(pretrained) and not local
    if download and source in ("timm", "smp") and not hub_reachable():
        raise offline_error(source, backbone, pretrained, f"{hub_endpoint()} is unreachable")
    try:
        if source == "torchvision":
            weights = None
            if download:
                weights = "DEFAULT" if pretrained is True else str(pretrained)
            trunk: EncoderTrunk = TorchvisionTrunk(backbone, in_channels, output_stride, weights)
        elif source == "timm":
            tag: bool | str = (
                (pretrained if isinstance(pretrained, str) else True) if download else False
            )
            trunk = TimmTrunk(backbone, in_channels, output_stride, tag)
        else:
            weights = None
            if download:
                weights = "imagenet" if pretrained is True else str(pretrained)
            trunk = SmpTrunk(backbone, in_channels, output_stride, weights)
    except ConfigError:
        raise
    except Exception as e:
        if download and looks_offline(e):
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
            raise offline_error(source, backbone, pretrained, why) from None
        raise
    if local:
        load_local_weights(trunk, Path(str(pretrained)).expanduser())
    return trunk


class CamClassifier(nn.Module):
    """``encoder -> (B,C,h,w) -> GAP -> Linear(C,K)``.

    Args:
        num_classes: K.
        backbone, source, in_channels, output_stride, pretrained: see :func:`build_encoder`.
        dropout: dropout on the pooled vector (training only; does not break CAM maths).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet18",
        source: str = "torchvision",
        in_channels: int = 3,
        output_stride: int = 32,
        pretrained: bool | str = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"num_classes={num_classes}: need at least one class")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.output_stride = output_stride
        self.encoder = build_encoder(backbone, source, in_channels, output_stride, pretrained)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(self.encoder.out_channels, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map, (B,C,h,w)."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, (B,K)."""
        return self.classifier(self.dropout(self.features(x).mean(dim=(2, 3))))


def build_classifier(net_config: Mapping[str, Any], label: str) -> nn.Module:
    """A ``CamClassifier`` from a checkpoint's ``net_config``, through the whitelist."""
    kwargs = classifier_kwargs(net_config, label)
    try:
        return CamClassifier(**kwargs)
    except CamsegError as e:
        raise CheckpointError(f"{label}: its network cannot be rebuilt ({e})") from None
