"""LightningModule for stage 1: multi-label (sigmoid + BCE) or multi-class (softmax + CE)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import Metric, MetricCollection
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

from camseg.checkpoints import plain_data
from camseg.cls.regularisers import check_regulariser, regulariser_loss
from camseg.data.preprocess import record_datamodule
from camseg.models.classifier import CamClassifier

SPLITS = ("train", "val", "test")
LOSS = "loss"
METRIC_KEYS = ("auroc", "ap", "f1", "acc")


def metric_name(split: str, key: str, class_name: str | None = None) -> str:
    """The one place metric names are spelled: ``val/auroc`` (macro), ``val/auroc_<class>``."""
    return f"{split}/{key}" if class_name is None else f"{split}/{key}_{class_name}"


def _metrics(num_classes: int, multilabel: bool) -> MetricCollection:
    """Per-class metrics (``average=None``); macro means are taken when logging.

    One multi-label class uses the binary metrics (torchmetrics needs >= 2 labels).
    """
    if multilabel and num_classes == 1:
        return MetricCollection(
            {
                "auroc": BinaryAUROC(),
                "ap": BinaryAveragePrecision(),
                "f1": BinaryF1Score(),
                "acc": BinaryAccuracy(),
            }
        )
    if multilabel:
        n = num_classes
        return MetricCollection(
            {
                "auroc": MultilabelAUROC(num_labels=n, average=None),
                "ap": MultilabelAveragePrecision(num_labels=n, average=None),
                "f1": MultilabelF1Score(num_labels=n, average=None),
                "acc": MultilabelAccuracy(num_labels=n, average=None),
            }
        )
    return MetricCollection(
        {
            "auroc": MulticlassAUROC(num_classes=num_classes, average=None),
            "ap": MulticlassAveragePrecision(num_classes=num_classes, average=None),
            "f1": MulticlassF1Score(num_classes=num_classes, average=None),
            "acc": MulticlassAccuracy(num_classes=num_classes, average=None),
        }
    )


class LabelCounts(Metric):
    """Positives per class and images seen, synced across ranks like the other metrics.

    torchmetrics returns 0 for the AUROC of a class whose targets are all one value; the
    counts let such undefined values be logged as NaN and left out of the macro mean.
    """

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.positives: torch.Tensor
        self.total: torch.Tensor
        self.add_state("positives", torch.zeros(num_classes), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(()), dist_reduce_fx="sum")

    def update(self, labels: torch.Tensor) -> None:
        """``labels``: (B,K) multi-hot (one-hot for multi-class)."""
        self.positives += (labels > 0.5).sum(dim=0).to(self.positives.dtype)
        self.total += labels.shape[0]

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.positives, self.total - self.positives


class ClassifierModule(L.LightningModule):
    """Trains a :class:`CamClassifier` on image-level labels.

    Args:
        net: the classifier (kept out of hparams; its config is saved as ``net_config``
            so later stages can rebuild it from the checkpoint alone).
        optimizer: partial taking the parameters (Hydra ``_partial_: true``).
        class_names: names of the K classes, in label order.
        scheduler: optional partial taking the optimizer (stepped once per epoch).
        multilabel: sigmoid + BCE (True) or softmax + CE (False; one positive per image).
        pos_weight: BCE positive weights per class (multi-label only), e.g. (1-f)/f.
        net_config: the config that built ``net`` (stored in the checkpoint).
        preprocess: the preprocessing record (``Preprocessing.to_dict()``) stored in the
            checkpoint for ``camseg-predict`` and ``camseg-cam``; when None, the fitting
            DataModule's ``preprocess`` is recorded at setup.
        channels_last: run convolutions in channels-last memory format.
        regulariser: None, ``equivariance`` or ``puzzle`` (see camseg.cls.regularisers).
        regulariser_weight: its weight in the training loss.
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
        preprocess: dict | None = None,
        channels_last: bool = False,
        regulariser: str | None = None,
        regulariser_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.regulariser = check_regulariser(regulariser, regulariser_weight)
        self.regulariser_weight = float(regulariser_weight)
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
            if pos_weight is not None:
                raise ValueError("pos_weight applies to multi-label (BCE) training only")
            self.loss_fn = nn.CrossEntropyLoss()
        self.channels_last = channels_last
        # Attributes, not a ModuleDict: nn.Module reserves the key "train".
        self.train_metrics, self.val_metrics, self.test_metrics = (
            _metrics(k, multilabel) for _ in SPLITS
        )
        self.train_counts, self.val_counts, self.test_counts = (LabelCounts(k) for _ in SPLITS)
        # Detached (logits, labels) of the current epoch per split, on the device.
        self._outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {s: [] for s in SPLITS}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain containers only (no OmegaConf, numpy), so the file loads with weights_only=True.
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = plain_data(checkpoint["hyper_parameters"])
        checkpoint.pop("hparams_type", None)

    def logged_metric_names(self, splits: Sequence[str] = SPLITS) -> list[str]:
        """Every name this module logs for ``splits`` (the stage checks the monitor against them)."""
        names = []
        for split in splits:
            names.append(metric_name(split, LOSS))
            for key in METRIC_KEYS:
                names.append(metric_name(split, key))
                names += [metric_name(split, key, c) for c in self.class_names]
        return names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B,K) of images (B,C,H,W)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def setup(self, stage: str) -> None:
        record_datamodule(self.hparams, self._trainer)
        # Here rather than in on_fit_start so that validate/test/predict runs get it too.
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)

    def _split_metrics(self, split: str) -> MetricCollection:
        return getattr(self, f"{split}_metrics")

    def _split_counts(self, split: str) -> LabelCounts:
        return getattr(self, f"{split}_counts")

    def _has_progress_bar(self) -> bool:
        return self._trainer is not None and self.trainer.progress_bar_callback is not None

    def _targets(self, labels: torch.Tensor) -> torch.Tensor:
        return labels if self.multilabel else labels.argmax(dim=1)

    def _step(self, batch: dict, split: str) -> torch.Tensor:
        logits = self(batch["image"])
        labels = batch["labels"]
        loss = self.loss_fn(logits, self._targets(labels))
        # Metrics see the epoch's outputs at its end, in one update: torchmetrics' per-call
        # input checks synchronise with the GPU, which would stall every training step.
        self._outputs[split].append((logits.detach(), labels.detach()))
        on_step = split == "train"
        self.log(
            metric_name(split, LOSS),
            loss,
            on_step=on_step,
            on_epoch=True,
            # Lightning turns progress-bar values into Python floats after every batch (a GPU
            # sync per step): show the step loss only where a progress bar will display it.
            prog_bar=not on_step or self._has_progress_bar(),
            batch_size=len(logits),
            sync_dist=split != "train",
        )
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        if self.regulariser is None:
            return loss
        reg = regulariser_loss(
            self.regulariser, self.net, batch["image"], self._targets(batch["labels"]), self.loss_fn
        )
        self.log(
            "train/regulariser", reg, on_step=False, on_epoch=True, batch_size=len(batch["image"])
        )
        return loss + self.regulariser_weight * reg

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test")

    def epoch_metrics(self, split: str) -> dict[str, torch.Tensor]:
        """Per-class and macro values of ``split``'s metrics; NaN where undefined.

        Buffered outputs are added first, so this can be called at any point of an epoch.

        AUROC needs positives and negatives of a class, AP (and multi-class accuracy,
        which is per-class recall) needs positives; the macro mean skips undefined classes.
        """
        self._flush(split)
        values = self._split_metrics(split).compute()
        positives, negatives = self._split_counts(split).compute()
        undefined = {"auroc": (positives == 0) | (negatives == 0), "ap": positives == 0}
        if not self.multilabel:
            undefined["acc"] = positives == 0
        out: dict[str, torch.Tensor] = {}
        for key, per_class in values.items():
            per_class = per_class.float().reshape(-1)
            if key in undefined:
                per_class = per_class.masked_fill(undefined[key], float("nan"))
            out[metric_name(split, key)] = per_class.nanmean()
            for name, v in zip(self.class_names, per_class, strict=True):
                out[metric_name(split, key, name)] = v
        return out

    def _flush(self, split: str) -> None:
        """Move the buffered outputs of ``split`` into its metrics."""
        outputs = self._outputs[split]
        if not outputs:
            return
        logits = torch.cat([o[0] for o in outputs]).float()
        labels = torch.cat([o[1] for o in outputs])
        outputs.clear()
        target = self._targets(labels).long()
        metrics = self._split_metrics(split)
        if self.multilabel:
            probs = torch.sigmoid(logits)
            if probs.shape[1] == 1:
                metrics.update(probs[:, 0], target[:, 0])
            else:
                metrics.update(probs, target)
        else:
            metrics.update(torch.softmax(logits, dim=1), target)
        self._split_counts(split).update(labels)

    def _log_epoch(self, split: str) -> None:
        self._flush(split)
        if int(self._split_counts(split).total) == 0:  # no batch this epoch (e.g. limit_*=0)
            return
        values = self.epoch_metrics(split)
        for name, v in values.items():  # torchmetrics already synced the states across ranks
            self.log(name, v, prog_bar=name == metric_name(split, "auroc"))
        self._split_metrics(split).reset()
        self._split_counts(split).reset()

    def _start_epoch(self, split: str) -> None:
        # Outputs of an epoch that was interrupted must not leak into this one.
        self._outputs[split].clear()
        self._split_metrics(split).reset()
        self._split_counts(split).reset()

    def on_train_epoch_start(self) -> None:
        self._start_epoch("train")

    def on_validation_epoch_start(self) -> None:
        self._start_epoch("val")

    def on_test_epoch_start(self) -> None:
        self._start_epoch("test")

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }
