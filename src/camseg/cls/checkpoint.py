"""Rebuild a stage-1 classifier from its checkpoint alone (no config needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from camseg.errors import CamsegError
from camseg.models.classifier import CamClassifier


def read_hparams(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CamsegError(f"{path}: cannot read checkpoint ({e})") from None
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not hp or "net_config" not in hp or "class_names" not in hp:
        raise CamsegError(
            f"{path}: not a camseg classifier checkpoint (no net_config/class_names in its hyper-parameters)"
        )
    return ckpt


def load_classifier(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[CamClassifier, dict[str, Any]]:
    """Load a :class:`CamClassifier` and its hyper-parameters from a stage-1 checkpoint.

    The network is rebuilt with ``pretrained=False`` (the checkpoint holds the weights),
    so loading never downloads anything.
    """
    path = Path(path)
    ckpt = read_hparams(path)
    hp = dict(ckpt["hyper_parameters"])
    net_cfg = dict(hp["net_config"])
    net_cfg["pretrained"] = False
    net: CamClassifier = instantiate(net_cfg)
    state = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CamsegError(
            f"{path}: weights do not fit the network its config describes ({str(e).splitlines()[0]})"
        ) from None
    net.to(map_location).eval()
    return net, hp


def check_compatible(path: Path, class_names: list[str], net_config: dict | None = None) -> None:
    """Refuse a checkpoint trained for other classes or another network, in one line."""
    hp = read_hparams(path)["hyper_parameters"]
    if list(hp["class_names"]) != list(class_names):
        raise CamsegError(
            f"{path}: checkpoint was trained for classes {list(hp['class_names'])} but the dataset has {list(class_names)}; "
            "use the matching data config or another run_name"
        )
    if net_config is not None:
        theirs = {
            k: hp["net_config"].get(k)
            for k in ("backbone", "source", "in_channels", "output_stride", "num_classes")
        }
        ours = {k: net_config.get(k) for k in theirs}
        diff = {
            k: (theirs[k], ours[k]) for k in theirs if ours[k] is not None and theirs[k] != ours[k]
        }
        if diff:
            raise CamsegError(
                f"{path}: checkpoint is of another model ({', '.join(f'{k}: {a} vs {b}' for k, (a, b) in diff.items())}); "
                "use the model config it was trained with or another run_name"
            )
