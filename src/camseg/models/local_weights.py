"""Encoder weights from a local file: read it safely, find its tensors under this trunk's names.

A file may hold a bare encoder, a CamClassifier or Lightning checkpoint of this project, or a
library's own weights (torchvision ``resnet18-*.pth``, timm / smp state dicts); its keys are
matched through the wrappers and renames listed here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from camseg.checkpoints import load_checkpoint
from camseg.errors import ConfigError

log = logging.getLogger(__name__)

# A string ``pretrained`` with one of these endings is a local file, not a weight-set name.
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".tar")


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
    """A first-conv weight saved for other input channels, adapted like :func:`camseg.models.trunks.adapt_first_conv`."""
    if (
        value.ndim != 4
        or len(shape) != 4
        or value.shape[0] != shape[0]
        or value.shape[2:] != shape[2:]
    ):
        return None
    c = shape[1]
    return (value.sum(dim=1, keepdim=True) / c).repeat(1, c, 1, 1)


def load_local_weights(trunk: nn.Module, path: Path) -> None:
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
