"""The torch side of the folder format: what one sample reads (:class:`SampleDataset`),
the epoch-seeded shuffle and augmentation seeds, the collation, and 2.5D neighbours.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, RandomSampler, default_collate

from camseg.data.folder import DatasetIndex, Sample
from camseg.data.preprocess import Preprocessing, context_indices, to_channels
from camseg.data.slice_cache import SliceCache
from camseg.errors import DatasetError
from camseg.utils.io import read_image, read_mask


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
