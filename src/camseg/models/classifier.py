"""CamClassifier: encoder -> feature map -> global average pooling -> one linear layer.

Nothing sits between the pooled features and the logits, so for every class k

    logit_k = mean_hw( sum_c w_kc F_c ) + b_k,

which makes the model CAM-compatible by construction: the CAM engine reads
``features(x)`` and ``classifier`` directly, without hooks.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from camseg.errors import ConfigError

SOURCES = ("torchvision", "timm", "smp")
_TV_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2")


class _TorchvisionTrunk(nn.Module):
    """A torchvision classification network cut before its pooling and head."""

    def __init__(self, name: str, in_channels: int, output_stride: int, weights: str | None) -> None:
        super().__init__()
        import torchvision

        kwargs: dict = {}
        if output_stride != 32:
            if name not in _TV_RESNETS:
                raise ConfigError(
                    f"model.net.output_stride={output_stride}: torchvision '{name}' cannot be dilated; "
                    "use a ResNet, or source=timm / source=smp, or output_stride=32"
                )
            if name not in ("resnet18", "resnet34"):
                kwargs["replace_stride_with_dilation"] = [False, output_stride == 8, True]
        try:
            net = torchvision.models.get_model(name, weights=weights, **kwargs)
        except ValueError as e:
            raise ConfigError(f"model.net.backbone='{name}': not a torchvision model ({e})") from None
        if output_stride != 32 and name in ("resnet18", "resnet34"):
            # BasicBlock cannot dilate: un-stride the last stage(s) instead (the usual WSSS trick).
            stages = [net.layer4] if output_stride == 16 else [net.layer3, net.layer4]
            for stage in stages:
                stage[0].conv1.stride = (1, 1)
                stage[0].downsample[0].stride = (1, 1)
        if name.startswith(("resnet", "resnext", "wide_resnet")):
            self.body = nn.Sequential(
                net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
            )
            self.out_channels = net.fc.in_features
            first = "body.0"
        elif name.startswith("densenet"):
            # DenseNet's final norm is followed by a ReLU inside torchvision's forward.
            self.body = nn.Sequential(net.features, nn.ReLU(inplace=False))
            self.out_channels = net.classifier.in_features
            first = "body.0.conv0"
        elif name.startswith(("efficientnet", "mobilenet", "convnext", "regnet", "vgg")):
            self.body = net.features
            head = net.classifier if hasattr(net, "classifier") else net.fc
            last = [m for m in head.modules() if isinstance(m, nn.Linear)]
            self.out_channels = last[0].in_features if name.startswith(("efficientnet", "convnext", "mobilenet_v2")) else _probe_channels(self.body)
            first = "body.0.0"
        else:
            raise ConfigError(
                f"model.net.backbone='{name}': torchvision family not supported; use resnet*, densenet*, efficientnet*, convnext*, or source=timm"
            )
        if in_channels != 3:
            _adapt_first_conv(self, first, in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _probe_channels(body: nn.Module) -> int:
    with torch.no_grad():
        return int(body(torch.zeros(1, 3, 64, 64)).shape[1])


def _adapt_first_conv(module: nn.Module, path: str, in_channels: int) -> None:
    """Replace the first convolution for ``in_channels`` inputs, keeping (summed/repeated) weights."""
    parent_path, _, attr = path.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    conv = getattr(parent, attr)
    if isinstance(conv, nn.Sequential):  # e.g. efficientnet's Conv2dNormActivation
        parent, attr, conv = conv, "0", conv[0]
    if not isinstance(conv, nn.Conv2d):
        raise ConfigError(f"cannot adapt the first layer ({type(conv).__name__}) to {in_channels} input channels")
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.bias is not None
    )
    with torch.no_grad():
        w = conv.weight.sum(dim=1, keepdim=True) / in_channels
        new.weight.copy_(w.repeat(1, in_channels, 1, 1))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    setattr(parent, attr, new)


class _TimmTrunk(nn.Module):
    def __init__(self, name: str, in_channels: int, output_stride: int, pretrained: bool) -> None:
        super().__init__()
        import timm

        kwargs: dict = {"features_only": True, "out_indices": (-1,), "in_chans": in_channels}
        if output_stride != 32:
            kwargs["output_stride"] = output_stride
        try:
            self.body = timm.create_model(name, pretrained=pretrained, **kwargs)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ConfigError(f"model.net.backbone='{name}': unknown timm model; see timm.list_models()") from None
            raise
        self.out_channels = int(self.body.feature_info.channels()[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)[-1]


class _SmpTrunk(nn.Module):
    def __init__(self, name: str, in_channels: int, output_stride: int, weights: str | None) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp

        try:
            self.body = smp.encoders.get_encoder(name, in_channels=in_channels, depth=5, weights=weights, output_stride=output_stride)
        except KeyError as e:
            raise ConfigError(f"model.net.backbone='{name}': unknown smp encoder ({e})") from None
        self.out_channels = int(self.body.out_channels[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)[-1]


def build_encoder(
    backbone: str, source: str = "torchvision", in_channels: int = 3, output_stride: int = 32, pretrained: bool | str = False
) -> nn.Module:
    """Build a feature extractor by name with an ``out_channels`` attribute.

    Args:
        backbone: model name in its source library (``resnet18``, ``efficientnet_b0``, ``densenet121``, ...).
        source: ``torchvision``, ``timm`` or ``smp``.
        in_channels: input channels (1 for grayscale CT/MRI, 3 for RGB or stacked windows).
        output_stride: 32 (standard), 16 or 8 (dilated last stages: finer CAMs).
        pretrained: False for random init; True or a weight-set name to download
            (needs internet); a path to a local checkpoint file to load.
    """
    if source not in SOURCES:
        raise ConfigError(f"model.net.source='{source}': use one of {list(SOURCES)}")
    if output_stride not in (8, 16, 32):
        raise ConfigError(f"model.net.output_stride={output_stride}: use 8, 16 or 32")
    local = isinstance(pretrained, str) and (os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".ckpt", ".bin", ".safetensors")))
    download = bool(pretrained) and not local
    try:
        if source == "torchvision":
            weights = None
            if download:
                weights = "DEFAULT" if pretrained is True else str(pretrained)
            trunk: nn.Module = _TorchvisionTrunk(backbone, in_channels, output_stride, weights)
        elif source == "timm":
            trunk = _TimmTrunk(backbone, in_channels, output_stride, download)
        else:
            weights = None
            if download:
                weights = "imagenet" if pretrained is True else str(pretrained)
            trunk = _SmpTrunk(backbone, in_channels, output_stride, weights)
    except ConfigError:
        raise
    except Exception as e:
        if download and _looks_offline(e):
            raise ConfigError(
                f"model.net.pretrained={pretrained!r}: could not download weights for {source} '{backbone}' "
                f"({type(e).__name__}: {e}); no internet here? set model.net.pretrained=false, or a local checkpoint path"
            ) from None
        raise
    if local:
        _load_local_weights(trunk, Path(str(pretrained)))
    return trunk


def _looks_offline(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return any(
        s in text
        for s in ("urlopen", "connection", "resolve", "network", "offline", "max retries", "timed out", "hub", "http", "name or service")
    ) or isinstance(e, OSError)


def _load_local_weights(trunk: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"model.net.pretrained='{path}': file not found; give an existing checkpoint or pretrained=false")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"model.net.pretrained='{path}': not a state dict")
    own = trunk.state_dict()
    # Accept checkpoints of a whole CamClassifier / LightningModule as well as bare trunks.
    matched = {}
    for k, v in state.items():
        for prefix in ("", "encoder.", "net.encoder.", "model.encoder."):
            if k.startswith(prefix) and k[len(prefix) :] in own and own[k[len(prefix) :]].shape == v.shape:
                matched[k[len(prefix) :]] = v
                break
    if not matched:
        raise ConfigError(f"model.net.pretrained='{path}': no tensor in it matches the '{type(trunk).__name__}' encoder")
    trunk.load_state_dict(matched, strict=False)


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

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) CAMs of every class in one pass: (B,K,h,w).

        ``cam(x).mean((2,3)) + classifier.bias == forward(x)`` in eval mode.
        """
        f = self.features(x)
        return torch.einsum("bchw,kc->bkhw", f, self.classifier.weight)
