"""LightningModule for stage 1: multi-label (sigmoid + BCE) or multi-class (softmax + CE)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryAveragePrecision,
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassAveragePrecision,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelAUROC,
    MultilabelAveragePrecision,
    MultilabelF1Score,
)

from camseg.models.classifier import CamClassifier

METRIC_KEYS = ("auroc", "ap", "f1", "acc")


def _metrics(num_classes: int, multilabel: bool) -> MetricCollection:
    """Per-class metrics (``average=None``); macro means are taken when logging.

    One multi-label class uses the binary metrics (torchmetrics needs >= 2 labels).
    """
    if multilabel and num_classes == 1:
        return MetricCollection(
            {"auroc": BinaryAUROC(), "ap": BinaryAveragePrecision(), "f1": BinaryF1Score(), "acc": BinaryAccuracy()}
        )
    if multilabel:
        k = {"num_labels": num_classes, "average": None}
        return MetricCollection(
            {
                "auroc": MultilabelAUROC(**k),
                "ap": MultilabelAveragePrecision(**k),
                "f1": MultilabelF1Score(**k),
                "acc": MultilabelAccuracy(**k),
            }
        )
    k = {"num_classes": num_classes, "average": None}
    return MetricCollection(
        {
            "auroc": MulticlassAUROC(**k),
            "ap": MulticlassAveragePrecision(**k),
            "f1": MulticlassF1Score(**k),
            "acc": MulticlassAccuracy(**k),
        }
    )


class ClassifierModule(L.LightningModule):
    """Trains a :class:`CamClassifier` on image-level labels.

    Args:
        net: the classifier (kept out of hparams; its config is saved as ``net_config``
            so later stages can rebuild it from the checkpoint alone).
        optimizer: partial taking the parameters (Hydra ``_partial_: true``).
        scheduler: optional partial taking the optimizer.
        class_names: names of the K classes, in label order.
        multilabel: sigmoid + BCE (True) or softmax + CE (False; one positive per image).
        pos_weight: BCE positive weights per class (multi-label only), e.g. (1-f)/f.
        net_config: the config that built ``net`` (stored in the checkpoint).
        channels_last: run convolutions in channels-last memory format.
    """

    def __init__(
        self,
        net: CamClassifier,
        optimizer: Callable[..., torch.optim.Optimizer],
        class_names: Sequence[str],
        scheduler: Callable[..., Any] | None = None,
        multilabel: bool = True,
        pos_weight: Sequence[float] | None = None,
        net_config: dict | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.class_names = list(class_names)
        self.multilabel = multilabel
        k = len(self.class_names)
        if net.num_classes != k:
            raise ValueError(f"net has {net.num_classes} outputs but {k} class names were given")
        if multilabel:
            pw = torch.tensor(pos_weight, dtype=torch.float32) if pos_weight is not None else None
            self.loss_fn: nn.Module = nn.BCEWithLogitsLoss(pos_weight=pw)
        else:
            self.loss_fn = nn.CrossEntropyLoss()
        self.channels_last = channels_last
        self.train_metrics = _metrics(k, multilabel)
        self.val_metrics = _metrics(k, multilabel)
        self.test_metrics = _metrics(k, multilabel)

    # Names this module logs: the stage runner checks the monitor against them before training.
    def logged_metric_names(self) -> list[str]:
        names = ["train/loss", "val/loss", "test/loss"]
        for split in ("train", "val", "test"):
            for key in METRIC_KEYS:
                names.append(f"{split}/{key}")
                names += [f"{split}/{key}_{c}" for c in self.class_names]
        return names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def on_fit_start(self) -> None:
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)

    def _targets(self, labels: torch.Tensor) -> torch.Tensor:
        return labels if self.multilabel else labels.argmax(dim=1)

    def _step(self, batch: dict, split: str, metrics: MetricCollection) -> torch.Tensor:
        logits = self(batch["image"])
        target = self._targets(batch["labels"])
        loss = self.loss_fn(logits, target)
        probs = torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)
        if self.multilabel and probs.shape[1] == 1:
            metrics.update(probs[:, 0].float(), target[:, 0].long())
        else:
            metrics.update(probs.float(), target.long())
        self.log(f"{split}/loss", loss, on_step=split == "train", on_epoch=True, prog_bar=True, batch_size=len(logits), sync_dist=split != "train")
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_metrics)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val", self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test", self.test_metrics)

    def _log_epoch(self, split: str, metrics: MetricCollection) -> None:
        values = metrics.compute()
        out: dict[str, torch.Tensor] = {}
        for key, per_class in values.items():
            per_class = per_class.float().reshape(-1)
            out[f"{split}/{key}"] = per_class.nanmean()
            for name, v in zip(self.class_names, per_class, strict=True):
                out[f"{split}/{key}_{name}"] = v
        for name, v in out.items():  # torchmetrics already synced the states across ranks
            self.log(name, v, prog_bar=name == f"{split}/auroc")
        metrics.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train", self.train_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_metrics)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
