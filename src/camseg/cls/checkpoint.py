"""Rebuild a stage-1 classifier from its checkpoint alone (no config needed).

The file is read through :mod:`camseg.checkpoints` (``weights_only=True``, no fallback) and
the network rebuilt from camseg's whitelist, never from the ``_target_`` it stores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from camseg.checkpoints import (
    CLASSIFIER,
    check_same_model,
    classifier_kwargs,
    load_weights,
    read_checkpoint,
    state_dict,
)
from camseg.models.classifier import CamClassifier, build_classifier


def read_hparams(path: Path, label: str | None = None, fix: str | None = None) -> dict[str, Any]:
    """The checkpoint (a dict), refused in one line unless it is a camseg classifier checkpoint."""
    return read_checkpoint(path, CLASSIFIER, label, fix)


def load_classifier(
    path: str | Path, map_location: str | torch.device = "cpu", label: str | None = None
) -> tuple[CamClassifier, dict[str, Any]]:
    """Load a :class:`CamClassifier` and its hyper-parameters from a stage-1 checkpoint.

    The network is rebuilt with ``pretrained=False`` (the checkpoint holds the weights),
    so loading never downloads anything and never reads another file.
    """
    path = Path(path)
    label = label or str(path)
    ckpt = read_hparams(path, label)
    hp = dict(ckpt["hyper_parameters"])
    net = build_classifier(hp["net_config"], label)
    assert isinstance(net, CamClassifier)
    load_weights(net, state_dict(ckpt, label), label)
    net.to(map_location).eval()
    return net, hp


def check_compatible(
    path: Path,
    class_names: list[str],
    net_config: dict | None = None,
    label: str | None = None,
    fix: str | None = None,
) -> dict[str, Any]:
    """Refuse a checkpoint trained for other classes or another network, in one line.

    Returns the checkpoint, so a caller can check more (e.g. that it can resume a fit).
    """
    label = label or str(path)
    ckpt = read_hparams(path, label, fix)
    hp = ckpt["hyper_parameters"]
    classifier_kwargs(hp["net_config"], label)  # a foreign _target_ or key is refused here too
    keys = ("backbone", "source", "in_channels", "output_stride", "num_classes")
    check_same_model(hp, class_names, net_config, keys, label, "model")
    return ckpt
