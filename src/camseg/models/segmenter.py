"""The stage-3 network: an smp architecture with K+1 outputs (background first)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from camseg.checkpoints import CheckpointError, segmenter_kwargs
from camseg.errors import CamsegError, ConfigError


def build_segmentation_net(
    arch: str,
    encoder_name: str,
    encoder_weights: str | None,
    in_channels: int,
    num_classes: int,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """``smp.create_model`` with K+1 output channels (background first).

    ``model_kwargs`` go to the architecture (e.g. ``decoder_channels`` for Unet).
    """
    import segmentation_models_pytorch as smp

    try:
        return smp.create_model(
            arch=arch,
            encoder_name=encoder_name,
            encoder_weights=encoder_weights,
            in_channels=in_channels,
            classes=num_classes + 1,
            **dict(model_kwargs or {}),
        )
    except TypeError as e:
        raise ConfigError(f"seg.net.model_kwargs: {e}") from None
    except KeyError as e:
        raise ConfigError(
            f"seg.net.arch='{arch}' / seg.net.encoder_name='{encoder_name}': unknown to segmentation-models-pytorch ({e})"
        ) from None
    except Exception as e:
        if encoder_weights and any(
            s in str(e).lower() for s in ("url", "connection", "resolve", "http", "network")
        ):
            raise ConfigError(
                f"seg.net.encoder_weights={encoder_weights}: download failed ({type(e).__name__}); no internet? set seg.net.encoder_weights=null"
            ) from None
        raise


def build_segmenter(net_config: Mapping[str, Any], label: str) -> nn.Module:
    """An smp network from a checkpoint's ``net_config``, through the whitelist."""
    kwargs = segmenter_kwargs(net_config, label)
    try:
        return build_segmentation_net(**kwargs)
    except CamsegError as e:
        raise CheckpointError(f"{label}: its network cannot be rebuilt ({e})") from None
