"""A per-process cache of decoded slices, so that 2.5D input decodes each file once.

With ``data.context_slices=k`` every sample stacks the slices ``-k..+k`` of its patient, so
without a cache each slice file is read and decoded ``2k+1`` times per epoch. The cache keeps
the decoded planes (uint8, as :func:`camseg.data.preprocess.to_channels` returns them) in a
least-recently-used dict bounded in bytes. Each DataLoader worker holds its own (the dataset
is copied into every worker); nothing is written to disk.

Entries are keyed by the file's path, size and modification time (ns): a file rewritten in
place is decoded again. Cached arrays are read-only; callers concatenate them into new arrays,
so the batches are those of the uncached path, bit for bit.

What it saves depends on the order: in stage 2 and in validation (file order) a slice's
neighbours come next, and each file is decoded once. In shuffled training a neighbour is
reused when it is still cached, i.e. with a probability of about the cache's share of the
split's slices (per worker): a cache that holds the split decodes each file once per run.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

MIB = 1024 * 1024


class SliceCache:
    """LRU of decoded planes, at most ``max_bytes`` of them (0: off, every call decodes)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[tuple[str, int, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        # Sent to each DataLoader worker (or pickled with the dataset): start empty there.
        state = self.__dict__.copy()
        state.update(_items=OrderedDict(), _bytes=0, hits=0, misses=0, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def get(self, path: Path, decode: Callable[[Path], np.ndarray]) -> np.ndarray:
        """``decode(path)``, from the cache when the file is unchanged since it was cached."""
        if self.max_bytes == 0:
            return decode(path)
        st = os.stat(path)
        key = (os.fspath(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            plane = self._items.get(key)
            if plane is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return plane
        plane = decode(path)
        plane.setflags(write=False)
        with self._lock:
            self.misses += 1
            if plane.nbytes <= self.max_bytes and key not in self._items:
                self._items[key] = plane
                self._bytes += plane.nbytes
                while self._bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.nbytes
        return plane

    def __len__(self) -> int:
        return len(self._items)
