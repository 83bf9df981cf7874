"""LightningDataModule over the camseg folder format.

One module serves all three stages: classification batches (image + labels), CAM
prediction batches over a split, and segmentation batches whose training masks come
from the pseudo-label manifest while validation and test use ground-truth masks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from camseg.data.dataset import EpochShuffle, Item, SampleDataset, collate, neighbour_paths
from camseg.data.folder import DatasetIndex, Sample, load_index
from camseg.data.preprocess import Preprocessing
from camseg.data.slice_cache import MIB
from camseg.data.splits import assign_splits
from camseg.data.transforms import build_transforms
from camseg.errors import ConfigError, DatasetError
from camseg.resolvers import check_channel_counts
from camseg.utils.large import DEFAULT_MAX_IMAGE_PIXELS

log = logging.getLogger(__name__)


class CamSegDataModule(L.LightningDataModule):
    """DataModule over a dataset root in the camseg folder format.

    Args:
        root: dataset root (``labels.csv`` inside).
        classes: class columns to use (default: all non-reserved columns).
        image_size: network input side (images and masks are resized to it).
        in_channels: network input channels (``(2*context_slices+1) * per-slice channels``).
        slice_channels: channels of one slice; when set, ``in_channels`` must be it times
            ``2*context_slices+1`` (the config derives ``in_channels`` from it).
        context_slices: 2.5D input: neighbours on each side stacked as channels.
        batch_size, num_workers, pin_memory: DataLoader settings.
        val_fraction, test_fraction, split_seed: patient-level split.
        cv_folds, cv_fold: with ``cv_fold`` set, the split is that fold of a k-fold
            cross-validation by patient (test = the fold; see ``camseg.data.splits.cv_split``).
        mean, std: per-channel normalisation of [0,1] intensities.
        windows: the CT windows (names such as ``lung`` or ``C/W`` in HU) that made the
            images, one per slice channel; recorded for ``camseg-predict`` to apply to
            NIfTI and DICOM input (the images on disk are already windowed).
        train_transforms: albumentations (or ``_target_`` configs) for training batches.
        predict_split: the split whose CAMs stage 2 computes (``train``, or ``all``).
        max_image_pixels: above this many pixels an image's float maps (CAMs, logits,
            overlays) are computed at a bounded working size and a warning is logged once.
        synthetic: generator arguments; when set and ``root`` has no labels.csv, the
            synthetic dataset is generated there on first use.
        data_dir: camseg's own data directory (``paths.data_dir``): the synthetic dataset is
            generated only inside it; None lets a Python caller generate into ``root``.
    """

    def __init__(
        self,
        root: str,
        classes: list[str] | None = None,
        image_size: int = 128,
        in_channels: int = 1,
        context_slices: int = 0,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.25,),
        windows: Sequence[str] | str | None = None,
        train_transforms: Sequence[Any] | None = None,
        predict_split: str = "train",
        synthetic: dict | None = None,
        data_dir: str | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        slice_channels: int | None = None,
        cv_folds: int | None = None,
        cv_fold: int | None = None,
        decode_cache_mb: float = 256,
    ) -> None:
        super().__init__()
        if decode_cache_mb < 0:
            raise ConfigError(
                f"data.decode_cache_mb={decode_cache_mb}: must be >= 0 (0: no cache of decoded slices)"
            )
        self.decode_cache_bytes = int(decode_cache_mb * MIB)
        check_channel_counts(int(in_channels), slice_channels, int(context_slices))
        self.cv_folds, self.cv_fold = cv_folds, cv_fold
        self.root = Path(root)
        self.classes_arg = list(classes) if classes else None
        self.image_size = int(image_size)
        self.in_channels = int(in_channels)
        self.context_slices = int(context_slices)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.split_seed = split_seed
        self.mean, self.std = list(mean), list(std)
        self.windows = windows if windows is None or isinstance(windows, str) else list(windows)
        self.train_augmentations = list(train_transforms or [])
        if predict_split not in ("train", "val", "test", "all"):
            raise ConfigError(f"data.predict_split='{predict_split}': use train, val, test or all")
        self.predict_split = predict_split
        self.synthetic = dict(synthetic) if synthetic else None
        self.data_dir = data_dir
        self.max_image_pixels = int(max_image_pixels) if max_image_pixels else None
        self.index: DatasetIndex | None = None
        self.splits: dict[str, list[Sample]] = {}
        # Stage 3: the pseudo-mask of each training sample id.
        self.train_masks: dict[str, Path] | None = None
        self.full_res_eval = False  # stage 3: test batches carry full-resolution masks

    # -- setup ---------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.synthetic is not None and not (self.root / "labels.csv").exists():
            from camseg.data.synthetic import generate_if_asked

            log.info("generating the synthetic dataset into %s", self.root)
            generate_if_asked(self.root, self.synthetic, self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.index is not None:
            return
        self.prepare_data()  # idempotent; covers processes where prepare_data was not called
        self.index = load_index(self.root, classes=self.classes_arg)
        self.splits = assign_splits(
            self.index.samples,
            self.val_fraction,
            self.test_fraction,
            self.split_seed,
            cv_folds=self.cv_folds,
            cv_fold=self.cv_fold,
        )
        self._neighbours = (
            neighbour_paths(self.index, self.context_slices) if self.context_slices else {}
        )
        log.info(
            "dataset %s: %d samples, classes %s, split (patients) %s",
            self.root,
            len(self.index),
            self.index.classes,
            {k: len({s.group for s in v}) for k, v in self.splits.items()},
        )

    def _index(self) -> DatasetIndex:
        """The dataset index, set up on first use (not an assert: ``python -O`` skips those)."""
        if self.index is None:
            self.setup()
        assert self.index is not None
        return self.index

    @property
    def classes(self) -> list[str]:
        return self._index().classes

    @property
    def preprocess(self) -> Preprocessing:
        """The preprocessing record of this data (checked; class names need the index)."""
        return replace(self.input_preprocess, class_names=tuple(self.classes))

    @property
    def input_preprocess(self) -> Preprocessing:
        """The record without class names (needs no dataset index); ConfigError if inconsistent."""
        return Preprocessing.from_config(
            self.image_size,
            self.in_channels,
            self.context_slices,
            self.mean,
            self.std,
            self.windows,
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def samples(self, split: str) -> list[Sample]:
        return list(self._index().samples) if split == "all" else self.splits[split]

    def items(self, split: str, masks: dict[str, Path] | None = None) -> list[Item]:
        """Items of a split; ``masks`` overrides mask paths (and keeps only the samples it names)."""
        index = self._index()
        out = []
        for s in self.samples(split):
            if masks is not None:
                if s.id not in masks:
                    continue
                mask: Path | None = masks[s.id]
            else:
                mask = index.path(s.mask) if s.mask else None
            out.append(
                Item(
                    s.id,
                    index.path(s.image),
                    mask,
                    s.labels,
                    s.group,
                    self._neighbours.get(s.id, ()),
                )
            )
        return out

    def dataset(
        self, split: str, train: bool, masks: dict[str, Path] | None = None, full_res: bool = False
    ) -> SampleDataset:
        # Drawn from torch's generator so that `seed` (seed_everything) fixes the augmentations too.
        seed = (
            int(torch.randint(0, 2**31 - 1, (1,)).item())
            if train and self.train_augmentations
            else None
        )
        tf = build_transforms(
            self.image_size, self.train_augmentations if train else None, seed=seed
        )
        return SampleDataset(
            self.items(split, masks),
            tf,
            self.input_preprocess,
            full_res,
            augment_seed=seed,
            decode_cache_bytes=self.decode_cache_bytes,
        )

    def _loader(
        self, ds: SampleDataset, shuffle: bool, batch_size: int, split: str | None = None
    ) -> DataLoader:
        if len(ds) == 0:
            which = f"the '{split}' split" if split else "a split"
            raise DatasetError(
                f"{self.root}: {which} is empty; add patients, change data.val_fraction/test_fraction "
                "or the 'split' column of labels.csv"
            )
        # Drawn from torch's generator like the augmentation seed, so `seed` fixes the order.
        sampler = (
            EpochShuffle(ds, int(torch.randint(0, 2**31 - 1, (1,)).item())) if shuffle else None
        )
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
            collate_fn=collate,
        )

    # -- loaders ---------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        ds = self.dataset("train", True, self.train_masks)
        if len(ds) == 0 and self.train_masks is not None:
            raise DatasetError(
                f"{self.root}: no training sample has a pseudo-mask ({len(self.train_masks)} given); "
                "run stage pseudo on this dataset and split first"
            )
        loader = self._loader(ds, True, self.batch_size, "train")
        # Lightning makes the first iterator (and, with workers, prefetches from it) before
        # any epoch hook, and does not make a new one for the first epoch of a resumed fit:
        # the sampler and the augmentations must already know that epoch here.
        trainer = self.trainer
        epoch = (
            int(trainer.fit_loop.epoch_progress.current.processed)  # type: ignore[attr-defined]
            if trainer is not None
            else 0
        )
        ds.set_epoch(epoch)
        if isinstance(loader.sampler, EpochShuffle):
            loader.sampler.set_epoch(epoch)
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val", False), False, self.eval_batch_size, "val")

    def test_dataloader(self) -> DataLoader:
        ds = self.dataset("test", False, full_res=self.full_res_eval)
        return self._loader(ds, False, self.eval_batch_size, "test")

    def predict_dataloader(self) -> DataLoader:
        ds = self.dataset(self.predict_split, False)
        return self._loader(ds, False, self.eval_batch_size, self.predict_split)

    def label_frequencies(self) -> torch.Tensor:
        """Positive fraction per class in the training split, (K,)."""
        train = self.samples("train")
        if not train:
            raise DatasetError(
                f"{self.root}: the 'train' split is empty; give some patients split=train or leave it empty"
            )
        labels = np.array([s.labels for s in train], dtype=np.float64)
        return torch.tensor(labels.mean(axis=0), dtype=torch.float32)
