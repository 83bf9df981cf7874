"""CamClassifier: encoder -> feature map -> global average pooling -> one linear layer.

Nothing sits between the pooled features and the logits, so for every class k

    logit_k = mean_hw( sum_c w_kc F_c ) + b_k,

which makes the model CAM-compatible by construction: the CAM engine reads
``features(x)`` and ``classifier`` directly, without hooks.
"""

from __future__ import annotations

import logging
import os
import socket
import urllib.request
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse

import torch
from torch import nn

from camseg.checkpoints import load_checkpoint
from camseg.errors import ConfigError

log = logging.getLogger(__name__)

SOURCES = ("torchvision", "timm", "smp")
OUTPUT_STRIDES = (8, 16, 32)
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
# A string ``pretrained`` with one of these endings is a local file, not a weight-set name.
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".tar")
# Seconds to wait for the weight hub's host before calling the machine offline.
HUB_PROBE_TIMEOUT_S = 3.0


class EncoderTrunk(nn.Module):
    """A feature extractor: images (B,in,H,W) -> last feature map (B,out_channels,h,w)."""

    out_channels: int


class _TorchvisionTrunk(EncoderTrunk):
    """A torchvision classification network cut before its pooling and head."""

    def __init__(
        self, name: str, in_channels: int, output_stride: int, weights: str | None
    ) -> None:
        super().__init__()
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
        if name.startswith(("resnet", "resnext", "wide_resnet")):
            self.body = nn.Sequential(
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
            self.body = nn.Sequential(net.features, nn.ReLU(inplace=False))
            first = "body.0.conv0"
        elif name.startswith(("efficientnet", "mobilenet", "convnext")):
            self.body = net.features
            first = "body.0.0"
        elif name.startswith("vgg"):
            self.body = net.features
            first = "body.0"
        elif name.startswith("regnet"):
            self.body = nn.Sequential(net.stem, net.trunk_output)
            first = "body.0.0"
        else:
            raise ConfigError(
                f"model.net.backbone='{name}': torchvision family not supported; use resnet*, densenet*, "
                "efficientnet*, convnext*, mobilenet*, regnet*, vgg*, or source=timm"
            )
        if in_channels != 3:
            _adapt_first_conv(self, first, in_channels)
        self.out_channels = _probe_channels(self.body, in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _probe_channels(body: nn.Module, in_channels: int) -> int:
    """Channels of ``body``'s output, read from one tiny forward pass (eval, no grad)."""
    was_training = body.training
    body.eval()
    try:
        with torch.no_grad():
            return int(body(torch.zeros(1, in_channels, 64, 64)).shape[1])
    finally:
        body.train(was_training)


def _adapt_first_conv(module: nn.Module, path: str, in_channels: int) -> None:
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


class _TimmTrunk(EncoderTrunk):
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


class _SmpTrunk(EncoderTrunk):
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


def is_local_weights(pretrained: bool | str | None) -> bool:
    """True when ``pretrained`` names a file on disk rather than a weight set to download."""
    if not isinstance(pretrained, str) or not pretrained:
        return False
    return (
        "/" in pretrained
        or os.sep in pretrained
        or pretrained.startswith("~")
        or pretrained.endswith(_CHECKPOINT_SUFFIXES)
        or Path(pretrained).exists()
    )


def _hub_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT)
    except Exception:  # an old or missing huggingface_hub: timm/smp then fail on their own
        return "https://huggingface.co"


def hub_reachable(url: str | None = None, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the weight hub's host answers a TCP connection within ``timeout`` seconds.

    huggingface_hub retries a failed request five times with back-off (about 50 s per
    file) before giving up; this probe lets an offline machine fail in seconds. Behind a
    proxy (or with ``HF_HUB_OFFLINE`` set, where only the cache is used) it says True and
    leaves the decision to the library.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    if urllib.request.getproxies():
        return True
    parsed = urlparse(url or _hub_endpoint())
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_error(source: str, backbone: str, pretrained: bool | str, why: str) -> ConfigError:
    return ConfigError(
        f"model.net.pretrained={pretrained!r}: cannot download {source} weights for '{backbone}' ({why}); "
        "offline? set model.net.pretrained=false, or a local checkpoint path"
    )


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
        raise _offline_error(source, backbone, pretrained, f"{_hub_endpoint()} is unreachable")
    try:
        if source == "torchvision":
            weights = None
            if download:
                weights = "DEFAULT" if pretrained is True else str(pretrained)
            trunk: EncoderTrunk = _TorchvisionTrunk(backbone, in_channels, output_stride, weights)
        elif source == "timm":
            tag: bool | str = (
                (pretrained if isinstance(pretrained, str) else True) if download else False
            )
            trunk = _TimmTrunk(backbone, in_channels, output_stride, tag)
        else:
            weights = None
            if download:
                weights = "imagenet" if pretrained is True else str(pretrained)
            trunk = _SmpTrunk(backbone, in_channels, output_stride, weights)
    except ConfigError:
        raise
    except Exception as e:
        if download and _looks_offline(e):
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
            raise _offline_error(source, backbone, pretrained, why) from None
        raise
    if local:
        _load_local_weights(trunk, Path(str(pretrained)).expanduser())
    return trunk


def _looks_offline(e: BaseException) -> bool:
    if isinstance(e, OSError):  # URLError, socket errors, huggingface_hub's cache misses
        return True
    text = f"{type(e).__name__} {e}".lower()
    return any(
        s in text
        for s in (
            "urlopen",
            "connection",
            "resolve",
            "network",
            "offline",
            "max retries",
            "timed out",
            "name or service",
            "localentrynotfound",
        )
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors holds no code; a damaged file is still one line
            raise ConfigError(
                f"model.net.pretrained='{path}': cannot read it as safetensors ({str(e).splitlines()[0][:120]})"
            ) from None
    # weights_only=True and no fallback: a weight file never runs code (camseg's own
    # Lightning checkpoints hold only tensors and plain data, so they load like this too).
    state = load_checkpoint(
        path, f"model.net.pretrained='{path}'", "give a state dict or checkpoint of tensors"
    )
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.net.pretrained='{path}': not a state dict of tensors")
    return state


# Wrappers a file may put around the encoder's own names: a CamClassifier, a
# ClassifierModule (Lightning), DataParallel.
_WRAPPER_PREFIXES = ("", "encoder.", "net.encoder.", "model.encoder.", "module.")
# torchvision's own checkpoint names -> this module's trunk (``body``) names.
_TV_RENAMES = (
    ("conv1.", "body.0."),
    ("bn1.", "body.1."),
    ("layer1.", "body.4."),
    ("layer2.", "body.5."),
    ("layer3.", "body.6."),
    ("layer4.", "body.7."),
    ("features.", "body."),  # efficientnet, convnext, mobilenet, vgg
    ("features.", "body.0."),  # densenet
    ("stem.", "body.0."),  # regnet
    ("trunk_output.", "body.1."),
)


def _candidate_keys(key: str) -> list[str]:
    """Names ``key`` may have in the trunk: as saved, under ``body.`` (timm, smp), or renamed."""
    out = []
    for prefix in _WRAPPER_PREFIXES:
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        out += [rest, f"body.{rest}"]
        out += [new + rest[len(old) :] for old, new in _TV_RENAMES if rest.startswith(old)]
    return out


def _fit_in_channels(value: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """A first-conv weight saved for other input channels, adapted like :func:`_adapt_first_conv`."""
    if (
        value.ndim != 4
        or len(shape) != 4
        or value.shape[0] != shape[0]
        or value.shape[2:] != shape[2:]
    ):
        return None
    c = shape[1]
    return (value.sum(dim=1, keepdim=True) / c).repeat(1, c, 1, 1)


def _load_local_weights(trunk: nn.Module, path: Path) -> None:
    """Load a local file's encoder tensors into ``trunk``.

    Accepts a bare encoder, a CamClassifier or Lightning checkpoint of this project, and the
    libraries' own files (torchvision ``resnet18-*.pth``, timm / smp state dicts). The first
    convolution is adapted when the file was saved for other input channels (RGB weights for
    grey CT), as downloads are.
    """
    if not path.is_file():
        raise ConfigError(
            f"model.net.pretrained='{path}': file not found; give an existing checkpoint or pretrained=false"
        )
    state = _read_state_dict(path)
    own = trunk.state_dict()
    first_conv = next((k for k, v in own.items() if v.ndim == 4), None)
    matched: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        for key in _candidate_keys(k):
            if key not in own or key in matched:
                continue
            if own[key].shape == v.shape:
                matched[key] = v
                break
            if key == first_conv and (fitted := _fit_in_channels(v, own[key].shape)) is not None:
                matched[key] = fitted
                break
    if not matched:
        raise ConfigError(
            f"model.net.pretrained='{path}': no tensor in it fits this encoder "
            f"({type(trunk).__name__}); was it saved from another backbone?"
        )
    missing = [k for k in own if k not in matched]
    if missing:
        log.warning(
            "model.net.pretrained=%s: %d of %d encoder tensors not in the file (kept random), e.g. %s",
            path,
            len(missing),
            len(own),
            missing[:3],
        )
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
