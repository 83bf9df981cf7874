"""LightningModule that trains the affinity network on confident pseudo-mask pairs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from camseg.checkpoints import AFFINITY, plain_data
from camseg.refine.net import AffinityNet, affinity_loss
from camseg.refine.pairs import grid_labels, local_offsets, pair_targets
from camseg.refine.walk import affinities

TRAIN_LOSS = "train/affinity_loss"


class AffinityModule(L.LightningModule):
    """Trains :class:`AffinityNet` from batches with ``image`` (B,C,H,W) and ``mask``
    (B,H,W) pseudo-masks in {0..K, 255}.

    Args:
        net: the affinity network (kept out of hparams; ``net_config`` rebuilds it).
        net_config: keyword arguments of ``net`` (see :func:`affinity_kwargs`).
        class_names: the K classes, for the record.
        radius: pair radius in grid cells.
        lr, weight_decay: AdamW settings.
    """

    def __init__(
        self,
        net: AffinityNet,
        net_config: dict[str, Any],
        class_names: Sequence[str],
        radius: int = 5,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.hparams["kind"] = AFFINITY
        self.net = net
        self.offsets = local_offsets(radius)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain containers only, so the file loads with weights_only=True.
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = plain_data(checkpoint["hyper_parameters"])
        checkpoint.pop("hparams_type", None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Half-disc affinities (B,P,h,w) of images (B,C,H,W)."""
        return affinities(self.net(images), self.offsets)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        aff = self(batch["image"])
        labels = grid_labels(batch["mask"], tuple(aff.shape[-2:]))
        loss, parts = affinity_loss(aff, pair_targets(labels, self.offsets))
        n = len(aff)
        self.log(TRAIN_LOSS, loss, on_step=False, on_epoch=True, batch_size=n)
        for key, value in parts.items():
            self.log(f"train/affinity_{key}", value, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return torch.optim.AdamW(self.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
