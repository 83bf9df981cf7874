"""LightningModule for stage 3: ignore-aware training on pseudo-masks, evaluation on ground truth."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from camseg.checkpoints import plain_data
from camseg.data.preprocess import record_datamodule
from camseg.seg.losses import build_loss
from camseg.seg.metrics import SegMetrics, group_ids
from camseg.utils.io import read_image, save_png_atomic
from camseg.utils.large import (
    DEFAULT_MAX_IMAGE_PIXELS,
    OVERLAY_MAX_PIXELS,
    resize_area,
    resize_nearest,
    warn_large,
    working_size,
)
from camseg.utils.overlay import GT_COLOUR, draw_contours, panel, to_rgb

MAX_PIXELS_KEY = "data.max_image_pixels"


def full_size_labels(logits: torch.Tensor, h: int, w: int, max_pixels: int | None) -> torch.Tensor:
    """(1,K+1,h',w') logits -> (h,w) uint8 labels; above ``max_pixels`` through a working size."""
    size = working_size(h, w, max_pixels)
    if tuple(logits.shape[-2:]) != size:
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    pred = logits.argmax(1)[0].to(torch.uint8)
    if size != (h, w):
        pred = F.interpolate(pred[None, None], size=(h, w), mode="nearest")[0, 0]
    return pred


class SegmenterModule(L.LightningModule):
    """Trains ``net`` on (pseudo-)masks with 255 = ignore; validates/tests on ground truth.

    Args:
        net: an smp model with K+1 output channels.
        class_names: the K foreground classes.
        loss: the loss module (``seg.loss`` instantiated; kept out of hparams), or
            ``build_loss`` keyword arguments (``name``, weights, ...).
        optimizer, scheduler: Hydra partials.
        net_config: what built ``net`` (stored for ``camseg-predict``).
        preprocess: the preprocessing record (``Preprocessing.to_dict()``) stored in the
            checkpoint for ``camseg-predict`` and ``camseg-cam``; when None, the fitting
            DataModule's ``preprocess`` is recorded at setup.
        predictions_dir: where test predictions and overlays are written (None: not written).
        overlays: how many test images get an overlay.
    """

    def __init__(
        self,
        net: nn.Module,
        class_names: Sequence[str],
        loss: nn.Module | Mapping[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        net_config: dict | None = None,
        data_config: dict | None = None,
        preprocess: dict | None = None,
        predictions_dir: str | None = None,
        overlays: int = 16,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "loss", "optimizer", "scheduler"])
        self.net = net
        self.class_names = list(class_names)
        k = len(self.class_names)
        self.loss_fn = (
            loss
            if isinstance(loss, nn.Module)
            else build_loss(**{"name": "dice_ce", **dict(loss)}, num_classes=k)
        )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_metrics = SegMetrics(k, self.class_names, prefix="val/")
        self.test_metrics = SegMetrics(k, self.class_names, prefix="test/")
        self.predictions_dir = Path(predictions_dir) if predictions_dir else None
        self.overlays = overlays
        self.channels_last = channels_last
        self._overlays_written = 0

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain containers only (no OmegaConf, numpy), so the file loads with weights_only=True.
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = plain_data(checkpoint["hyper_parameters"])
        checkpoint.pop("hparams_type", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def setup(self, stage: str) -> None:
        record_datamodule(self.hparams, self._trainer)

    def on_fit_start(self) -> None:
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = self.loss_fn(logits, batch["mask"])
        self.log(
            "train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(logits)
        )
        return loss

    def _eval_step(self, batch: dict[str, Any], split: str, metrics: SegMetrics) -> torch.Tensor:
        logits = self(batch["image"])
        has = batch["has_mask"]
        if isinstance(has, torch.Tensor) and bool(has.any()):
            sel = has.bool()
            target = batch["mask"][sel]
            loss = self.loss_fn(logits[sel], target)
            self.log(
                f"{split}/loss", loss, on_epoch=True, batch_size=int(sel.sum()), sync_dist=True
            )
            metrics.update(
                logits[sel].argmax(1),
                target,
                group_ids(
                    [g for g, s in zip(batch["group"], sel.tolist(), strict=True) if s],
                    device=self.device,
                ),
            )
        return logits

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        # Under DDP every rank must take part in the metric's sync, so only skip on one process.
        if self.val_metrics.update_count == 0 and self.trainer.world_size == 1:
            return
        values = self.val_metrics.compute()
        for k, v in values.items():
            self.log(k, float(v), prog_bar=k == "val/dice")
        self.val_metrics.reset()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Evaluate at each image's original size (logits resized, ground truth as stored)."""
        logits = self(batch["image"])
        has = batch["has_mask"].bool()
        full = batch.get("mask_full")
        preds = []
        for i in range(len(logits)):
            h, w = (int(v) for v in batch["orig_size"][i])
            pred = full_size_labels(logits[i : i + 1], h, w, self.max_image_pixels)
            warn_large("stage seg", batch["id"][i], h, w, self.max_image_pixels, MAX_PIXELS_KEY)
            preds.append(pred)
            if bool(has[i]) and full is not None:
                gt = full[i].to(pred.device)[None]
                self.test_metrics.update(
                    pred[None], gt, group_ids([batch["group"][i]], device=self.device)
                )
        if self.predictions_dir is not None:
            self._write_predictions(batch, preds)

    # Set by the stage: the test images that get an overlay (spread over the patients);
    # None draws the first ``overlays`` ones.
    overlay_ids: set[str] | None = None

    # Set by the stage from data.max_image_pixels: larger images are evaluated through a
    # bounded working size (logits resized there, labels resized to full size as uint8).
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS

    def _write_predictions(self, batch: dict[str, Any], preds: list[torch.Tensor]) -> None:
        assert self.predictions_dir is not None
        full = batch.get("mask_full")
        for i, pred in enumerate(preds):
            sid = batch["id"][i]
            p = pred.to(torch.uint8).cpu().numpy()
            save_png_atomic(self.predictions_dir / "predictions" / f"{sid}.png", p)
            chosen = (
                sid in self.overlay_ids
                if self.overlay_ids is not None
                else self._overlays_written < self.overlays
            )
            if chosen and "image_path" in batch:
                image = to_rgb(read_image(batch["image_path"][i]))
                # Drawn at a bounded size: a large image's overlay is a picture to look at.
                h, w = working_size(image.shape[0], image.shape[1], OVERLAY_MAX_PIXELS)
                image = resize_area(image, h, w)
                right = draw_contours(image, resize_nearest(p, h, w))
                title = "prediction"
                if full is not None and bool(batch["has_mask"][i]):
                    gt = full[i].cpu().numpy().astype(np.uint8)
                    right = draw_contours(right, resize_nearest(gt, h, w), colour=GT_COLOUR)
                    title = "prediction, truth"
                save_png_atomic(
                    self.predictions_dir / "overlays" / f"{sid}.png",
                    panel(image, right, titles=("image", title)),
                )
                self._overlays_written += 1

    def on_test_epoch_end(self) -> None:
        if self.test_metrics.update_count == 0 and self.trainer.world_size == 1:
            return
        values = self.test_metrics.compute()
        self.log_dict({k: float(v) for k, v in values.items()})
        self.test_metrics.reset()

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": self.scheduler_factory(optimizer=optimizer),
                "interval": "epoch",
            },
        }

    @torch.no_grad()
    def full_size_probabilities(
        self, images: torch.Tensor, h: int, w: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels (h,w) uint8, confidence (h,w) float) of one image, memory bounded.

        Above ``max_image_pixels`` the softmax is taken at a working size and both maps are
        resized to (h,w) by nearest neighbour (labels) and bilinearly (confidence, float16).
        """
        size = working_size(h, w, self.max_image_pixels)
        probs = self.probabilities(images, size=size)[0]
        conf, pred = probs.max(0)
        pred = pred.to(torch.uint8)
        if size != (h, w):
            pred = F.interpolate(pred[None, None], size=(h, w), mode="nearest")[0, 0]
            conf = F.interpolate(
                conf[None, None].half().float(), size=(h, w), mode="bilinear", align_corners=False
            )[0, 0].half()
        return pred, conf

    def probabilities(
        self, images: torch.Tensor, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Softmax (B,K+1,H,W), optionally resized to ``size``."""
        logits = self(images).float()
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits.softmax(1)
