"""2.5D input decodes each slice file once (per worker) and gives the same batches as before."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from camseg.data.datamodule import CamSegDataModule
from camseg.data.slice_cache import SliceCache
from camseg.errors import ConfigError
from camseg.utils.io import read_image, save_png_atomic

AUGMENT = [
    {"_target_": "albumentations.HorizontalFlip", "p": 0.5},
    {"_target_": "albumentations.Affine", "rotate": [-10, 10], "p": 0.5},
]


def _dm(root: Path, cache_mb: float) -> CamSegDataModule:
    dm = CamSegDataModule(
        str(root),
        image_size=32,
        in_channels=3,
        context_slices=1,
        batch_size=5,
        num_workers=0,
        val_fraction=0.2,
        test_fraction=0.2,
        train_transforms=AUGMENT,
        decode_cache_mb=cache_mb,
    )
    dm.setup("fit")
    return dm


def _batches(dm: CamSegDataModule, train: bool) -> list[dict]:
    torch.manual_seed(3)  # the augmentation seed and the order are drawn from it
    loader = dm.train_dataloader() if train else dm.predict_dataloader()
    return list(loader)


def test_cached_batches_equal_uncached_and_each_file_is_decoded_once(tiny_dataset: Path) -> None:
    plain, cached = _dm(tiny_dataset, 0), _dm(tiny_dataset, 64)
    for train in (True, False):
        a, b = _batches(plain, train), _batches(cached, train)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            assert x["image"].shape[1] == 3  # 1 grey channel x 3 slices
            assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
            assert x["id"] == y["id"]
    # In file order (stage 2) a slice's neighbours follow it: every file decoded once.
    ds = cached.dataset("train", False)
    for i in range(len(ds)):
        ds[i]
    files = {p for it in ds.items for p in it.neighbours}
    assert ds.slice_cache.misses == len(files) == len(ds.items)
    assert ds.slice_cache.hits == 3 * len(ds.items) - len(files)
    assert plain.dataset("train", False).slice_cache.max_bytes == 0


def test_a_rewritten_file_is_decoded_again(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    save_png_atomic(path, np.full((8, 8), 10, np.uint8))
    cache = SliceCache(1 << 20)
    first = cache.get(path, read_image)
    assert cache.get(path, read_image) is first and cache.hits == 1
    with pytest.raises(ValueError):
        first[0, 0] = 1  # cached planes are read-only: no caller can change another's batch
    save_png_atomic(path, np.full((8, 8), 200, np.uint8))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a later mtime, surely
    assert int(cache.get(path, read_image)[0, 0]) == 200 and cache.misses == 2


def test_the_cache_is_bounded_and_starts_empty_in_each_worker(tmp_path: Path) -> None:
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        save_png_atomic(paths[-1], np.full((16, 16), i, np.uint8))
    cache = SliceCache(2 * 256)  # two 16x16 planes
    for p in paths:
        cache.get(p, read_image)
    assert len(cache) == 2 and cache._bytes == 512
    cache.get(paths[3], read_image)
    assert cache.hits == 1  # the most recent stayed
    copy = pickle.loads(pickle.dumps(cache))
    assert len(copy) == 0 and copy.max_bytes == 512 and copy.hits == 0
    assert int(copy.get(paths[1], read_image)[0, 0]) == 1


def test_negative_cache_size_is_refused_in_one_line(tiny_dataset: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.decode_cache_mb=-1: must be >= 0"):
        CamSegDataModule(str(tiny_dataset), decode_cache_mb=-1)
