"""LightningDataModule over the camseg folder format.

One module serves all three stages: classification batches (image + labels), CAM
prediction batches over a split, and segmentation batches whose training masks come
from the pseudo-label manifest while validation and test use ground-truth masks.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence, Sized
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, default_collate

from camseg.data.folder import DatasetIndex, Sample, load_index
from camseg.data.preprocess import Preprocessing, context_indices, to_channels
from camseg.data.slice_cache import MIB, SliceCache
from camseg.data.splits import assign_splits
from camseg.data.transforms import build_transforms
from camseg.errors import ConfigError, DatasetError
from camseg.resolvers import check_channel_counts
from camseg.utils.io import read_image, read_mask
from camseg.utils.large import DEFAULT_MAX_IMAGE_PIXELS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """What a dataset reads for one sample: absolute paths, labels and identity."""

    id: str
    image: Path
    mask: Path | None
    labels: tuple[int, ...]
    group: str
    neighbours: tuple[Path, ...] = ()


class SampleDataset(Dataset):
    """Reads items; returns a dict of tensors.

    Keys: ``image`` float (C,H,W) normalised, ``mask`` int64 (H,W) (zeros when absent),
    ``has_mask`` bool, ``labels`` float (K,), ``id`` str, ``group`` str, ``index`` int,
    ``orig_size`` int64 (2,) = the image file's (H,W).
    """

    def __init__(
        self,
        items: Sequence[Item],
        transform: Any,
        preprocess: Preprocessing,
        full_res: bool = False,
        augment_seed: int | None = None,
        decode_cache_bytes: int = 0,
    ) -> None:
        self.items = list(items)
        # 2.5D: each slice is a neighbour of 2k+1 samples; decode it once (per worker).
        self.slice_cache = SliceCache(decode_cache_bytes if preprocess.context_slices else 0)
        self.full_res = full_res
        self.transform = transform
        # Random augmentations are drawn per sample from (augment_seed, epoch, index), not
        # from a generator that runs on through the epochs: a run resumed at epoch k sees
        # the augmentations of the uninterrupted run, whatever the number of workers. The
        # epoch sits in shared memory so that persistent DataLoader workers see it change.
        self.augment_seed = augment_seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """The training epoch whose augmentations ``__getitem__`` draws (0-based)."""
        self._epoch.fill_(int(epoch))

    def load_image(self, item: Item) -> np.ndarray:
        """(H,W,in_channels) uint8, neighbours stacked for 2.5D input."""
        paths = item.neighbours if self.preprocess.context_slices else (item.image,)
        planes = []
        for p in paths:
            try:
                planes.append(self.slice_cache.get(p, self._decode))
            except DatasetError:
                raise
            except Exception as e:
                raise DatasetError(
                    f"{p}: cannot read image ({e}); re-export the file or remove its row"
                ) from None
        shapes = {pl.shape for pl in planes}
        if len(shapes) > 1:
            raise DatasetError(
                f"{item.image}: neighbouring slices differ in size {sorted(shapes)}; 2.5D needs equal sizes"
            )
        return np.concatenate(planes, axis=2)

    def _decode(self, path: Path) -> np.ndarray:
        return to_channels(read_image(path), self.preprocess.channels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        image = self.load_image(item)
        h, w = image.shape[:2]
        has_mask = item.mask is not None
        if item.mask is not None:
            try:
                mask = read_mask(item.mask)
            except Exception as e:  # PIL raises several types for bad files
                raise DatasetError(
                    f"{item.mask}: cannot read mask ({e}); masks are single-channel PNGs of class indices"
                ) from None
            if mask.shape != (h, w):
                raise DatasetError(
                    f"{item.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {w}x{h}; masks must match their image"
                )
        else:
            mask = np.zeros((h, w), dtype=np.uint8)
        if self.augment_seed is not None:
            self.transform.set_random_seed(sample_seed(self.augment_seed, int(self._epoch), i))
        out = self.transform(image=image, mask=mask)
        img = self.preprocess.normalise(out["image"])
        sample = {
            "image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
            "mask": torch.from_numpy(np.ascontiguousarray(out["mask"])).long(),
            "has_mask": has_mask,
            "labels": torch.tensor(item.labels, dtype=torch.float32),
            "id": item.id,
            "group": item.group,
            "index": i,
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
        }
        if self.full_res:
            # Evaluation at the original resolution: the untouched mask and the image's path.
            # uint8 as stored (an int64 copy costs 8 bytes a pixel of a large image).
            sample["mask_full"] = torch.from_numpy(mask)
            sample["image_path"] = str(item.image)
        return sample


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one sample in one epoch, well mixed (SeedSequence) from the three."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class EpochShuffle(RandomSampler):
    """A random order that depends only on (seed, epoch), like ``DistributedSampler``.

    ``RandomSampler`` draws each epoch's order from torch's global generator, whose state a
    checkpoint does not hold, so a resumed run would see other orders than the run it
    continues. Lightning calls ``set_epoch`` before every training epoch (and replaces
    this sampler by a ``DistributedSampler`` under DDP, as it does a ``RandomSampler``).
    """

    def __init__(self, data_source: Sized, seed: int) -> None:
        super().__init__(data_source)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Any:
        g = torch.Generator()
        g.manual_seed(sample_seed(self.seed, self.epoch, 0))
        yield from torch.randperm(len(self.data_source), generator=g).tolist()


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Default collation, except full-resolution masks of different sizes stay a list."""
    full = [b.pop("mask_full") for b in batch] if "mask_full" in batch[0] else None
    out = default_collate(batch)
    if full is not None:
        out["mask_full"] = torch.stack(full) if len({f.shape for f in full}) == 1 else full
    return out


def neighbour_paths(index: DatasetIndex, context_slices: int) -> dict[str, tuple[Path, ...]]:
    """For each sample, the image paths of slices ``-k..+k`` of its patient, clamped at volume edges.

    Slices are ordered by the ``slice`` column (falling back to row order); a patient
    without neighbours repeats its own slice.
    """
    by_group: dict[str, list[Sample]] = defaultdict(list)
    for s in index.samples:
        by_group[s.group].append(s)
    out: dict[str, tuple[Path, ...]] = {}
    for ss in by_group.values():
        order = sorted(
            range(len(ss)), key=lambda j: (ss[j].slice if ss[j].slice is not None else j, j)
        )
        ordered = [ss[j] for j in order]
        n = len(ordered)
        for pos, s in enumerate(ordered):
            idx = context_indices(pos, n, context_slices)
            out[s.id] = tuple(index.path(ordered[j].image) for j in idx)
    return out


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
