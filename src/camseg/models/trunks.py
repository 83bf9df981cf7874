"""Feature extractors cut out of torchvision, timm and smp classification networks.

Each trunk maps images (B,in,H,W) to the last feature map (B,out_channels,h,w): the
torchvision networks are cut before their pooling and head (and dilated or un-strided for
``output_stride`` 16 or 8), timm and smp give their last feature stage.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from camseg.errors import ConfigError

_TV_RESNETS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)
_TV_BASIC_BLOCK = ("resnet18", "resnet34")


class EncoderTrunk(nn.Module):
    """A feature extractor: images (B,in,H,W) -> last feature map (B,out_channels,h,w)."""

    out_channels: int


class TorchvisionTrunk(EncoderTrunk):
    """A torchvision classification network cut before its pooling and head."""

    def __init__(
        self, name: str, in_channels: int, output_stride: int, weights: str | None
    ) -> None:
        super().__init__()
        net = _torchvision_net(name, output_stride, weights)
        self.body, first = _torchvision_body(name, net)
        if in_channels != 3:
            adapt_first_conv(self, first, in_channels)
        self.out_channels = probe_channels(self.body, in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _torchvision_net(name: str, output_stride: int, weights: str | None) -> nn.Module:
    """Build torchvision's ``name`` (checked weight set), dilated or un-strided to ``output_stride``."""
    import torchvision

    kwargs: dict = {}
    if output_stride != 32:
        if name not in _TV_RESNETS:
            raise ConfigError(
                f"model.net.output_stride={output_stride}: torchvision '{name}' cannot be dilated; "
                "use a ResNet, or source=timm / source=smp, or output_stride=32"
            )
        if name not in _TV_BASIC_BLOCK:
            kwargs["replace_stride_with_dilation"] = [False, output_stride == 8, True]
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        raise ConfigError(
            f"model.net.backbone='{name}': not a torchvision model; "
            "see torchvision.models.list_models(), or use source=timm / source=smp"
        ) from None
    if weights is not None:
        options = list(torchvision.models.get_model_weights(name).__members__)
        weights = weights.rsplit(".", 1)[-1]  # "ResNet18_Weights.IMAGENET1K_V1" works too
        if weights not in options:
            raise ConfigError(
                f"model.net.pretrained='{weights}': torchvision '{name}' has no such weight set; "
                f"use one of {options}, true, false, or a local checkpoint path"
            )
    net = builder(weights=weights, **kwargs)
    if output_stride != 32 and name in _TV_BASIC_BLOCK:
        # BasicBlock cannot dilate: un-stride the last stage(s) instead (the usual WSSS trick).
        stages = [net.layer4] if output_stride == 16 else [net.layer3, net.layer4]
        for stage in stages:
            stage[0].conv1.stride = (1, 1)
            stage[0].downsample[0].stride = (1, 1)
    return net


def _torchvision_body(name: str, net: Any) -> tuple[nn.Module, str]:
    """The network cut before its pooling and head, and the path of its first layer in the trunk."""
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        body = nn.Sequential(
            net.conv1,
            net.bn1,
            net.relu,
            net.maxpool,
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        first = "body.0"
    elif name.startswith("densenet"):
        # DenseNet's final norm is followed by a ReLU inside torchvision's forward.
        body = nn.Sequential(net.features, nn.ReLU(inplace=False))
        first = "body.0.conv0"
    elif name.startswith(("efficientnet", "mobilenet", "convnext")):
        body = net.features
        first = "body.0.0"
    elif name.startswith("vgg"):
        body = net.features
        first = "body.0"
    elif name.startswith("regnet"):
        body = nn.Sequential(net.stem, net.trunk_output)
        first = "body.0.0"
    else:
        raise ConfigError(
            f"model.net.backbone='{name}': torchvision family not supported; use resnet*, densenet*, "
            "efficientnet*, convnext*, mobilenet*, regnet*, vgg*, or source=timm"
        )
    return body, first


def probe_channels(body: nn.Module, in_channels: int) -> int:
    """Channels of ``body``'s output, read from one tiny forward pass (eval, no grad)."""
    was_training = body.training
    body.eval()
    try:
        with torch.no_grad():
            return int(body(torch.zeros(1, in_channels, 64, 64)).shape[1])
    finally:
        body.train(was_training)


def adapt_first_conv(module: nn.Module, path: str, in_channels: int) -> None:
    """Replace the first convolution for ``in_channels`` inputs, keeping (averaged) weights."""
    parent_path, _, attr = path.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    conv = getattr(parent, attr)
    if isinstance(conv, nn.Sequential):  # e.g. efficientnet's Conv2dNormActivation
        parent, attr, conv = conv, "0", conv[0]
    if not isinstance(conv, nn.Conv2d):
        raise ConfigError(
            f"cannot adapt the first layer ({type(conv).__name__}) to {in_channels} input channels"
        )
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        cast("tuple[int, int]", conv.kernel_size),
        cast("tuple[int, int]", conv.stride),
        cast("tuple[int, int] | str", conv.padding),
        cast("tuple[int, int]", conv.dilation),
        conv.groups,
        conv.bias is not None,
    )
    with torch.no_grad():
        # The mean over RGB, repeated: a grey image gives the same response as its RGB copy.
        w = conv.weight.sum(dim=1, keepdim=True) / in_channels
        new.weight.copy_(w.repeat(1, in_channels, 1, 1))
        if conv.bias is not None and new.bias is not None:
            new.bias.copy_(conv.bias)
    setattr(parent, attr, new)


class TimmTrunk(EncoderTrunk):
    def __init__(
        self, name: str, in_channels: int, output_stride: int, pretrained: bool | str
    ) -> None:
        super().__init__()
        import timm

        kwargs: dict = {"features_only": True, "out_indices": (-1,), "in_chans": in_channels}
        if output_stride != 32:
            kwargs["output_stride"] = output_stride
        model_name = name
        if isinstance(pretrained, str):  # a weight-set tag: resnet18 + a1_in1k -> resnet18.a1_in1k
            model_name = f"{name.split('.')[0]}.{pretrained}"
        try:
            self.body = timm.create_model(model_name, pretrained=bool(pretrained), **kwargs)
        except RuntimeError as e:
            if "Unknown model" in str(e) or "Invalid pretrained tag" in str(e):
                if model_name != name:
                    raise ConfigError(
                        f"model.net.pretrained='{pretrained}': timm has no weight set '{model_name}'; "
                        f"see timm.list_pretrained('{name}*')"
                    ) from None
                raise ConfigError(
                    f"model.net.backbone='{name}': unknown timm model; see timm.list_models()"
                ) from None
            raise
        except TypeError as e:
            if "output_stride" in str(e):
                raise ConfigError(
                    f"model.net.output_stride={output_stride}: timm '{name}' cannot be dilated; "
                    "use output_stride=32 or another backbone"
                ) from None
            raise
        self.out_channels = int(cast(Any, self.body).feature_info.channels()[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)[-1]


class SmpTrunk(EncoderTrunk):
    def __init__(
        self, name: str, in_channels: int, output_stride: int, weights: str | None
    ) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp

        if name not in smp.encoders.get_encoder_names() and not name.startswith("tu-"):
            raise ConfigError(
                f"model.net.backbone='{name}': unknown smp encoder; see "
                "segmentation_models_pytorch.encoders.get_encoder_names() (or tu-<timm name>)"
            )
        try:
            self.body = smp.encoders.get_encoder(
                name, in_channels=in_channels, depth=5, weights=weights, output_stride=output_stride
            )
        except (KeyError, ValueError, RuntimeError) as e:
            text = str(e).strip("'\"").splitlines()[0][:200]
            if "dilat" in text.lower() or "output_stride" in text:
                raise ConfigError(
                    f"model.net.output_stride={output_stride}: smp '{name}' cannot be dilated; use output_stride=32"
                ) from None
            if weights is not None and "weights" in text.lower():
                raise ConfigError(
                    f"model.net.pretrained='{weights}': smp '{name}' has no such weight set ({text})"
                ) from None
            raise ConfigError(
                f"model.net.backbone='{name}': smp cannot build it ({text})"
            ) from None
        self.out_channels = int(self.body.out_channels[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)[-1]
