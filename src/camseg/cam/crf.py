"""Dense CRF refinement of CAM probabilities (Krähenbühl & Koltun 2011), via pydensecrf2.

Post-processing on the CPU, one image at a time (the CRF library is per image). The
unary comes from the CAMs of the present classes, with background probability
``(1 - max_k CAM_k) ** bg_power``; the pairwise terms are a Gaussian smoothness
kernel and a bilateral appearance kernel on the image's intensities.

Kernel widths are fractions of the image's side (``sqrt(H*W)`` for a non-square image)
of the image the CRF runs on, which is the image's original size in stage 2 (or its
bounded working size above ``data.max_image_pixels``): one recipe then behaves the same
at 128, 256 or 512 px.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from camseg.errors import CamsegError, ConfigError
from camseg.optional import MissingPackageError, import_optional
from camseg.units import KERNEL_WIDTHS, check_kernel_width
from camseg.utils.densecrf import dense_crf


@dataclass(frozen=True)
class CRFConfig:
    """Dense-CRF parameters (defaults: IRN's ``crf_inference_label``, 3 px and 50 px, at 256 px).

    Attributes:
        iterations: mean-field iterations.
        gaussian_sxy, gaussian_compat: smoothness kernel width (fraction of the image
            side) and weight.
        bilateral_sxy, bilateral_srgb, bilateral_compat: appearance kernel widths
            (fraction of the image side; intensity on a 0..255 scale) and weight.
        bg_power: exponent of the background probability ``(1 - max fg)``; above 1
            shrinks the background (IRN's power trick), below 1 grows it.
    """

    iterations: int = 10
    gaussian_sxy: float = 3 / 256
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 50 / 256
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 10.0
    bg_power: float = 1.0

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ConfigError(f"pseudo.crf.iterations={self.iterations}: must be >= 1")
        for field in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb", "bg_power"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"pseudo.crf.{field}={getattr(self, field)}: must be > 0")
        for field in KERNEL_WIDTHS:
            check_kernel_width(field, getattr(self, field))
        for field in ("gaussian_compat", "bilateral_compat"):
            if getattr(self, field) < 0:
                raise ConfigError(f"pseudo.crf.{field}={getattr(self, field)}: must be >= 0")


def import_densecrf() -> tuple[Any, Any]:
    try:
        return import_optional("pydensecrf.densecrf", "pseudo.crf"), import_optional(
            "pydensecrf.utils", "pseudo.crf"
        )
    except MissingPackageError as e:
        raise MissingPackageError(f"{e}, or set pseudo.crf=null") from None


def _intensity_0_255(images: torch.Tensor) -> np.ndarray:
    """(B,C,H,W) uint8 or float -> (B,H,W,C) float32 on 0..255 (float: min-max per image)."""
    x = images.detach().float()
    if images.dtype != torch.uint8:
        low = x.amin(dim=(1, 2, 3), keepdim=True)
        high = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - low) / (high - low).clamp_min(1e-8) * 255.0
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def default_crf_workers() -> int:
    """The CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class CRFPool:
    """Runs the per-image CRF in ``workers`` processes: pydensecrf holds the GIL, so threads
    do not scale. ``workers`` 0 or 1 runs it in the calling thread.

    The pool uses the ``spawn`` start method (forking a process whose torch threads are
    running is unsafe), is started on first use and lives until :meth:`close`; only numpy
    arrays and numbers cross the process boundary, so the results
    are those of the in-process CRF, bit for bit. Safe to share between threads.
    """

    def __init__(self, workers: int) -> None:
        if workers < 0:
            raise ConfigError(f"pseudo.crf_workers={workers}: must be >= 0 (0 or 1: in-process)")
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> ProcessPoolExecutor | None:
        if self.workers <= 1:
            return None
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.workers, mp_context=multiprocessing.get_context("spawn")
                )
            return self._pool

    def map(self, jobs: list[tuple[Any, ...]]) -> list[np.ndarray]:
        """:func:`camseg.utils.densecrf.dense_crf` over ``jobs`` (its arguments), in order."""
        pool = self._executor()
        if pool is None:
            return [dense_crf(*job) for job in jobs]
        try:
            futures = [pool.submit(dense_crf, *job) for job in jobs]
            return [f.result() for f in futures]
        except BrokenProcessPool as e:
            raise CamsegError(
                f"the CRF process pool stopped ({e}); a script that runs stage pseudo must start "
                'under `if __name__ == "__main__":` (the pool starts processes with spawn), '
                "or set pseudo.crf_workers=0"
            ) from None

    def close(self, cancel: bool = False) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=cancel)
                self._pool = None

    def __enter__(self) -> CRFPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(cancel=exc[0] is not None)


def crf_refine(
    cams: torch.Tensor,
    present: torch.Tensor,
    images: torch.Tensor,
    config: CRFConfig,
    pool: CRFPool | None = None,
) -> torch.Tensor:
    """Refined foreground probabilities, (B,K,H,W) in [0,1], zero for absent classes.

    Args:
        cams: (B,K,H,W) normalised CAMs in [0,1].
        present: (B,K) bool, the classes in each image's label.
        images: (B,C,H,W) the images the CAMs belong to, same H,W.
        config: CRF parameters.
        pool: where the per-image CRFs run (None: here, one after the other).
    """
    import_densecrf()
    if images.shape[0] != cams.shape[0] or images.shape[-2:] != cams.shape[-2:]:
        raise ValueError(
            f"CRF needs images of the CAMs' size: images {tuple(images.shape)}, cams {tuple(cams.shape)}"
        )
    batch, _, height, width = cams.shape
    side = float(np.sqrt(height * width))
    sxy_px = (config.gaussian_sxy * side, config.bilateral_sxy * side)
    compat = (config.gaussian_compat, config.bilateral_compat)
    probs = cams.detach().float().clamp(0, 1).cpu().numpy()
    keep = present.cpu().numpy()
    if images.dtype == torch.uint8:  # exact on 0..255 already; a quarter of the bytes to ship
        pixels = images.detach().permute(0, 2, 3, 1).contiguous().cpu().numpy()
    else:
        pixels = _intensity_0_255(images)
    jobs, where = [], []
    for b in range(batch):  # the CRF library works on one image at a time
        classes = np.flatnonzero(keep[b])
        if classes.size == 0:
            continue
        fg = probs[b, classes]
        bg = (1.0 - fg.max(axis=0)) ** config.bg_power
        stack = np.concatenate([bg[None], fg]).astype(np.float32)
        stack /= np.maximum(stack.sum(axis=0, keepdims=True), 1e-8)
        jobs.append((stack, pixels[b], config.iterations, sxy_px, compat, config.bilateral_srgb))
        where.append((b, classes))
    out = np.zeros_like(probs)
    results = (pool or CRFPool(0)).map(jobs)
    for (b, classes), refined in zip(where, results, strict=True):
        out[b, classes] = refined
    return torch.from_numpy(out).to(cams.device)
