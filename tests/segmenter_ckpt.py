"""A tiny stage-3 checkpoint (untrained FPN/resnet18, one class ``lesion``), written as camseg
saves one: shared by the camseg-predict tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from camseg.data.preprocess import LEGACY_WINDOWS, Preprocessing
from camseg.models.segmenter import build_segmentation_net


def write_checkpoint(
    path: Path,
    in_channels: int = 1,
    context_slices: int = 0,
    windows: Sequence[str] | None = None,
    record: bool = True,
    image_size: int = 32,
    mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.25,),
) -> Path:
    """``record=False`` writes a checkpoint from before the preprocessing record; ``windows``
    defaults to those camseg-predict assumed then (brain, or brain/subdural/bone)."""
    net_cfg = {
        "arch": "FPN",
        "encoder_name": "resnet18",
        "encoder_weights": None,
        "in_channels": in_channels,
        "num_classes": 1,
    }
    net = build_segmentation_net(**net_cfg)
    data_config = {
        "image_size": image_size,
        "in_channels": in_channels,
        "context_slices": context_slices,
        "mean": list(mean),
        "std": list(std),
    }
    hp: dict = {"net_config": net_cfg, "data_config": data_config, "class_names": ["lesion"]}
    if record:
        per_slice = in_channels // (2 * context_slices + 1)
        hp["preprocess"] = Preprocessing.from_config(
            **data_config,
            windows=list(windows if windows is not None else LEGACY_WINDOWS.get(per_slice, ())),
            class_names=["lesion"],
        ).to_dict()
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "hyper_parameters": hp,
        },
        path,
    )
    return path
