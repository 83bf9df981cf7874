"""CAM generation through ``Trainer.predict`` and the writer that streams results to disk.

The LightningModule computes batched CAMs (TTA included) on the device and resizes them
to each image's original size; the writer callback hands every sample to a thread pool
that writes its mask, CAMs, overlay and manifest row, so disk I/O overlaps the next
batches and memory does not grow with the dataset. With a CRF, each thread hands its
sample's CRF to a process pool (``pseudo.crf_workers``; pydensecrf holds the GIL, so
threads alone would run it on one core) and waits for it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter

from camseg.cam import PseudoMaskPolicy
from camseg.cam.base import CamMethod, present_mask
from camseg.cam.crf import CRFPool, crf_refine, default_crf_workers
from camseg.cam.policy import rule_thresholds_many, threshold_cams
from camseg.constants import IGNORE_INDEX
from camseg.overlap import confusion_counts
from camseg.utils.io import (
    read_image,
    read_mask,
    save_npz_atomic,
    save_png_atomic,
    write_json_atomic,
)
from camseg.utils.large import (
    OVERLAY_MAX_PIXELS,
    resize_area,
    resize_nearest,
    warn_large,
    working_size,
)
from camseg.utils.overlay import pseudo_overlay

log = logging.getLogger(__name__)


class CamPredictModule(L.LightningModule):
    """Wraps a CAM engine for ``Trainer.predict``.

    ``predict_step`` returns ``ids``, ``labels`` (B,K), ``cams`` (B,K,H0,W0) float16 on
    the CPU at each image's original size, and ``masks`` (B,H0,W0) uint8 when the policy
    needs no image (no CRF), else None. An image above ``max_image_pixels`` gets its CAMs
    at a working size of at most that many pixels, and its mask is thresholded there and
    resized (nearest) to the image's size: memory stays bounded.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        engine: CamMethod,
        policy: PseudoMaskPolicy,
        channels_last: bool = False,
        max_image_pixels: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.engine = engine
        self.policy = policy
        self.channels_last = channels_last
        self.max_image_pixels = max_image_pixels

    def on_predict_start(self) -> None:
        self.model.eval()
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def predict_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Any]:
        images, labels = batch["image"], batch["labels"]
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # Gradient methods need autograd even inside Lightning's inference mode.
        with torch.inference_mode(False), torch.enable_grad():
            cams = self.engine(images.clone(), labels.clone())
        cams = cams.float()
        sizes = batch["orig_size"]
        out_cams: list[torch.Tensor]
        h0, w0 = (int(v) for v in sizes[0])
        if bool((sizes == sizes[0]).all()) and working_size(h0, w0, self.max_image_pixels) == (
            h0,
            w0,
        ):
            if (h0, w0) != tuple(cams.shape[-2:]):
                cams = F.interpolate(
                    cams, size=(h0, w0), mode="bilinear", align_corners=False
                ).clamp_(0, 1)
            masks = self.policy(cams, labels) if self.policy.crf is None else None
            out_cams = list(cams.half().cpu())
            out_masks = list(masks.cpu()) if masks is not None else [None] * len(out_cams)
        else:
            out_cams, out_masks = [], []
            for c, lab, (h, w), sid in zip(cams, labels, sizes.tolist(), batch["id"], strict=True):
                hw, ww = working_size(h, w, self.max_image_pixels)
                warn_large(
                    "stage pseudo", sid, h, w, self.max_image_pixels, "data.max_image_pixels"
                )
                c = F.interpolate(
                    c[None], size=(hw, ww), mode="bilinear", align_corners=False
                ).clamp_(0, 1)
                m = self.policy(c, lab[None])[0] if self.policy.crf is None else None
                out_cams.append(c[0].half().cpu())
                if m is not None and (hw, ww) != (h, w):
                    m = torch.from_numpy(resize_nearest(m.cpu().numpy(), h, w))
                out_masks.append(m.cpu() if m is not None else None)
        return {
            "ids": list(batch["id"]),
            "labels": labels.cpu(),
            "cams": out_cams,
            "masks": out_masks,
        }


@dataclass
class SampleInfo:
    """What the writer needs about a sample besides the CAMs: paths and identity."""

    id: str
    image: str  # relative to the dataset root
    image_path: Path
    gt_path: Path | None
    group: str


def sweep_counts(
    cams: np.ndarray,
    labels: np.ndarray,
    gt: np.ndarray,
    thresholds: Sequence[float],
    rule: str = "absolute",
) -> list[list[list[int]]]:
    """Counts per threshold of the CAM-only segmentation: :func:`threshold_cams` without ignore
    band, each threshold read under ``rule`` as the masks read ``fg_threshold``."""
    maps = torch.from_numpy(cams)[None]
    present = torch.from_numpy(labels.astype(bool))[None]
    preds = torch.cat(
        [
            threshold_cams(maps, present, t, t)
            for t in rule_thresholds_many(maps, rule, list(thresholds))
        ]
    )
    return confusion_counts(preds, torch.from_numpy(gt)[None], len(cams)).tolist()


def lacking_files(out_dir: Path, ids: set[str], save_cams: bool, overlay_ids: set[str]) -> set[str]:
    """The ids among ``ids`` whose mask (or CAMs, or overlay, where configured) is missing."""
    lacking = set()
    for sid in ids:
        files = [out_dir / "masks" / f"{sid}.png"]
        if save_cams:
            files.append(out_dir / "cams" / f"{sid}.npz")
        if sid in overlay_ids:
            files.append(out_dir / "overlays" / f"{sid}.png")
        if not all(f.is_file() for f in files):
            lacking.add(sid)
    return lacking


def _class_fractions(mask: np.ndarray, num_classes: int) -> list[float]:
    """Share of the pixels labelled 1..K, one bincount for all classes."""
    counts = np.bincount(mask.ravel(), minlength=256)[1 : num_classes + 1]
    return [float(v) for v in counts / mask.size]


class PseudoLabelWriter(BasePredictionWriter):
    """Writes each sample's artifacts, then its manifest row (the row marks it finished).

    Files: ``masks/<id>.png``, ``cams/<id>.npz`` (optional), ``overlays/<id>.png`` (the
    chosen samples), ``rows/<id>.json``. Each file is written atomically; a sample whose
    row exists is complete, so a killed run resumes by skipping those ids.
    """

    def __init__(
        self,
        out_dir: Path,
        samples: dict[str, SampleInfo],
        policy: PseudoMaskPolicy,
        num_classes: int,
        save_cams: bool,
        overlay_ids: set[str],
        sweep_thresholds: Sequence[float],
        workers: int = 4,
        crf_workers: int | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        self.out = out_dir
        self.samples = samples
        self.policy = policy
        self.num_classes = num_classes
        self.save_cams = save_cams
        self.overlay_ids = overlay_ids
        self.thresholds = list(sweep_thresholds)
        self.workers = workers
        # None: this rank's share of the cores (each DDP rank on a node runs its own pool).
        self.crf_workers = crf_workers
        self._crf_pool: CRFPool | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._threads = workers
        self._pending: list[Future] = []
        self.written = 0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for sub in ("masks", "rows", "overlays") + (("cams",) if self.save_cams else ()):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        threads = self.workers
        if self.policy.crf is not None:
            crf_workers = self.crf_workers
            if crf_workers is None:
                crf_workers = max(1, default_crf_workers() // max(1, trainer.num_devices))
            self._crf_pool = CRFPool(crf_workers)
            # A writer thread waits on its sample's CRF process: enough threads to keep all busy.
            threads = max(threads, crf_workers + 1)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="camseg-writer")
        self._threads = threads

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        assert self._pool is not None
        labels = prediction["labels"].numpy().astype(np.uint8)
        for i, sid in enumerate(prediction["ids"]):
            mask = prediction["masks"][i]
            self._pending.append(
                self._pool.submit(
                    self._write_one,
                    sid,
                    prediction["cams"][i].numpy(),
                    None if mask is None else mask.numpy(),
                    labels[i],
                )
            )
        # Bound the queue so memory stays flat: wait for the oldest writes to finish.
        while len(self._pending) > 32 * self._threads:
            self._pending.pop(0).result()
            self.written += 1

    def _write_one(
        self, sid: str, cams: np.ndarray, mask: np.ndarray | None, labels: np.ndarray
    ) -> None:
        info = self.samples[sid]
        image = None
        if mask is None or sid in self.overlay_ids:
            image = read_image(info.image_path)
        probs = cams.astype(np.float32)
        # What the classifier found before refinement, beside what the policy keeps (coverage).
        cam_support = self.policy.fg_support(torch.from_numpy(probs)[None])[0].tolist()
        if mask is None:
            assert image is not None
            mask, probs = self._crf_mask(image, probs, labels)
        mask = mask.astype(np.uint8)
        save_png_atomic(self.out / "masks" / f"{sid}.png", mask)
        if self.save_cams:
            save_npz_atomic(self.out / "cams" / f"{sid}.npz", cams=cams.astype(np.float16))
        row: dict[str, Any] = {
            "id": sid,
            "image": info.image,
            "mask": f"masks/{sid}.png",
            "group": info.group,
            "labels": labels.astype(int).tolist(),
            "fg_fraction": float(np.count_nonzero((mask > 0) & (mask != IGNORE_INDEX)) / mask.size),
            "ignore_fraction": float(np.count_nonzero(mask == IGNORE_INDEX) / mask.size),
            "class_fraction": _class_fractions(mask, self.num_classes),
            "cam_support": [float(v) for v in cam_support],
        }
        gt = None
        if info.gt_path is not None:
            gt, row["quality"] = self._quality(info.gt_path, mask, probs, labels)
        if sid in self.overlay_ids:
            assert image is not None
            self._write_overlay(sid, image, cams, labels, mask, gt)
        write_json_atomic(self.out / "rows" / f"{sid}.json", row)

    def _crf_mask(
        self, image: np.ndarray, probs: np.ndarray, labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """CRF: refine on the CPU with the image (at the CAMs' size, see CamPredictModule);
        the mask at the image's size, and the posterior, which the sweep then runs on."""
        small = resize_area(image, *probs.shape[1:])
        img_t = torch.from_numpy(small if small.ndim == 3 else small[..., None]).permute(2, 0, 1)[
            None
        ]
        lab_t = torch.from_numpy(labels)[None]
        assert self.policy.crf is not None
        probs_t = crf_refine(
            torch.from_numpy(probs)[None],
            present_mask(lab_t, 1),
            img_t,
            self.policy.crf,
            self._crf_pool,
        )
        mask = self.policy.threshold(probs_t, lab_t)[0].numpy()
        mask = resize_nearest(mask.astype(np.uint8), *image.shape[:2])
        return mask, probs_t[0].float().numpy()

    def _quality(
        self, gt_path: Path, mask: np.ndarray, probs: np.ndarray, labels: np.ndarray
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The ground truth, and the row's ``quality``: the mask's and the sweep's counts."""
        gt = read_mask(gt_path)
        if gt.shape != mask.shape:
            raise ValueError(f"{gt_path}: mask size {gt.shape} differs from its image {mask.shape}")
        return gt, {
            "counts": confusion_counts(
                torch.from_numpy(mask)[None], torch.from_numpy(gt)[None], self.num_classes
            )[0].tolist(),
            # at the CAMs' size (a large image's working size: see CamPredictModule)
            "sweep": sweep_counts(
                probs,
                labels,
                resize_nearest(gt, *probs.shape[1:]),
                self.thresholds,
                self.policy.threshold_rule,
            ),
            "gt_fraction": _class_fractions(gt, self.num_classes),
        }

    def _write_overlay(
        self,
        sid: str,
        image: np.ndarray,
        cams: np.ndarray,
        labels: np.ndarray,
        mask: np.ndarray,
        gt: np.ndarray | None,
    ) -> None:
        # Drawn at a bounded size: a large image's overlay is a picture to look at.
        h, w = working_size(cams.shape[1], cams.shape[2], OVERLAY_MAX_PIXELS)
        if (h, w) != cams.shape[1:]:
            cams = np.stack(
                [
                    cv2.resize(c.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
                    for c in cams
                ]
            )
        cam_map = (
            (cams.astype(np.float32) * labels[:, None, None]).max(axis=0)
            if labels.any()
            else np.zeros((h, w), np.float32)
        )
        save_png_atomic(
            self.out / "overlays" / f"{sid}.png",
            pseudo_overlay(
                resize_area(image, h, w),
                cam_map,
                resize_nearest(mask, h, w),
                None if gt is None else resize_nearest(gt, h, w),
            ),
        )

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush()

    def flush(self) -> None:
        for f in self._pending:
            f.result()  # re-raises a writer thread's error here
            self.written += 1
        self._pending.clear()

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        try:
            self.flush()
        finally:
            self._close(cancel=False)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # No orphaned CRF processes after a failed or interrupted run; files written so far
        # are complete (atomic), the rest is redone on resume.
        self._close(cancel=True)

    def _close(self, cancel: bool) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            self._pool = None
        if self._crf_pool is not None:
            self._crf_pool.close(cancel=cancel)
            self._crf_pool = None
