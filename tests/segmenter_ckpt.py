"""A tiny stage-3 checkpoint (untrained FPN/resnet18, one class ``lesion``), written as camseg
saves one: shared by the camseg-predict tests."""

from __future__ import annotations

from pathlib import Path

import torch

from camseg.models.segmenter import build_segmentation_net


def write_checkpoint(path: Path, in_channels: int = 1, context_slices: int = 0) -> Path:
    net_cfg = {
        "arch": "FPN",
        "encoder_name": "resnet18",
        "encoder_weights": None,
        "in_channels": in_channels,
        "num_classes": 1,
    }
    net = build_segmentation_net(**net_cfg)
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "hyper_parameters": {
                "net_config": net_cfg,
                "data_config": {
                    "image_size": 32,
                    "in_channels": in_channels,
                    "context_slices": context_slices,
                    "mean": [0.5],
                    "std": [0.25],
                },
                "class_names": ["lesion"],
            },
        },
        path,
    )
    return path
