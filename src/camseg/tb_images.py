"""TensorBoard pictures and hyper-parameters for stages 1 and 3 (``callbacks.tensorboard_images``).

Scalars alone do not show what a model looks at. Each validation epoch this callback logs
the first ``max_images`` validation images of the epoch's first batch:

- stage 1 (a classifier with a GAP + linear head): the CAM of every class over the image
  (``val_cam/<i>``), so the focus can be followed over the epochs;
- stage 3 (a segmenter): the prediction's contours, and the ground truth in yellow where the
  batch has it (``val_prediction/<i>``).

At the end of training the hyper-parameters are logged with the best monitored value, for
TensorBoard's HParams tab. Only a ``TensorBoardLogger`` receives anything; without one (a base
install without ``camseg[tensorboard]``, or ``logger=csv``) the callback does nothing.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

from camseg.utils.overlay import GT_COLOUR, cam_overlay, draw_contours, panel


def _tensorboard(trainer: L.Trainer) -> Any | None:
    from lightning.pytorch.loggers import TensorBoardLogger

    for lg in trainer.loggers:
        if isinstance(lg, TensorBoardLogger):
            return lg
    return None


def display_image(x: torch.Tensor) -> np.ndarray:
    """A normalised (C,H,W) input as uint8 (H,W): the middle channel, stretched to 0..255
    (for 2.5D inputs the middle channel is the slice itself)."""
    ch = x[x.shape[0] // 2].detach().float().cpu()
    lo, hi = float(ch.min()), float(ch.max())
    scaled = (ch - lo) / (hi - lo) if hi > lo else torch.zeros_like(ch)
    return (scaled.numpy() * 255).round().astype(np.uint8)


def cam_panels(module: L.LightningModule, images: torch.Tensor) -> list[np.ndarray]:
    """One picture per image: the image and one CAM overlay per class."""
    from camseg.cam.base import normalize_cams
    from camseg.cam.cam import CAM

    cams, _ = CAM(module.net).cams_and_logits(images)  # type: ignore[arg-type]
    cams = torch.nn.functional.interpolate(cams, size=images.shape[-2:], mode="bilinear")
    maps = normalize_cams(cams).cpu().numpy()
    out = []
    for i in range(len(images)):
        gray = display_image(images[i])
        out.append(panel(gray, *(cam_overlay(gray, c) for c in maps[i])))
    return out


def prediction_panels(module: L.LightningModule, batch: dict[str, Any]) -> list[np.ndarray]:
    """One picture per image: the image and the predicted contours (+ ground truth)."""
    images = batch["image"]
    with torch.no_grad():
        pred = module(images).argmax(dim=1).to(torch.uint8).cpu().numpy()
    masks, has = batch.get("mask"), batch.get("has_mask")
    out = []
    for i in range(len(images)):
        gray = display_image(images[i])
        rgb = np.repeat(gray[..., None], 3, axis=2)
        drawn = draw_contours(rgb, pred[i])
        if masks is not None and (has is None or bool(has[i])):
            gt = masks[i].cpu().numpy().astype(np.uint8)
            drawn = draw_contours(drawn, gt, colour=GT_COLOUR)
        out.append(panel(gray, drawn))
    return out


class TensorBoardImages(L.Callback):
    """Log CAMs (stage 1) or predictions (stage 3) of a few validation images per epoch.

    Args:
        max_images: how many images of the first validation batch to draw.
    """

    def __init__(self, max_images: int = 4) -> None:
        if max_images < 0:
            raise ValueError(f"callbacks.tensorboard_images.max_images={max_images}: must be >= 0")
        self.max_images = max_images

    @rank_zero_only
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        tb = _tensorboard(trainer)
        if tb is None or batch_idx != 0 or trainer.sanity_checking or not self.max_images:
            return
        n = min(self.max_images, len(batch["image"]))
        small = {k: v[:n] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        net = getattr(pl_module, "net", None)
        if hasattr(net, "features") and isinstance(
            getattr(net, "classifier", None), torch.nn.Linear
        ):
            tag, pictures = "val_cam", cam_panels(pl_module, small["image"])
        else:
            tag, pictures = "val_prediction", prediction_panels(pl_module, small)
        for i, picture in enumerate(pictures):
            tb.experiment.add_image(f"{tag}/{i}", picture, trainer.global_step, dataformats="HWC")

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tb = _tensorboard(trainer)
        ckpt: Any = trainer.checkpoint_callback
        if tb is None or ckpt is None or getattr(ckpt, "best_model_score", None) is None:
            return
        monitor = str(getattr(ckpt, "monitor", "score"))
        tb.log_hyperparams(pl_module.hparams, {f"hp/{monitor}": float(ckpt.best_model_score)})


__all__ = ["TensorBoardImages", "cam_panels", "display_image", "prediction_panels"]
