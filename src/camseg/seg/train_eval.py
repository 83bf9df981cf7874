"""Stage 3 after training: the segmenter on its own (pseudo-labelled) training images.

Three things come out of one pass: the segmenter vs ground truth on the training images
(the "pseudo-masks alone vs segmenter" comparison), the figure grid, and for
self-training (``seg.rounds`` > 1) new confident masks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from camseg.constants import IGNORE_INDEX
from camseg.data.datamodule import CamSegDataModule
from camseg.data.dataset import Item, collate
from camseg.pseudo.manifest import Manifest
from camseg.seg.cases import spread_over_patients
from camseg.seg.metrics import SegMetrics, group_ids
from camseg.seg.module import MAX_PIXELS_KEY, SegmenterModule
from camseg.utils.io import read_image, read_mask, save_png_atomic
from camseg.utils.large import (
    OVERLAY_MAX_PIXELS,
    resize_area,
    resize_nearest,
    warn_large,
    working_size,
)
from camseg.utils.overlay import GT_COLOUR, cam_overlay, draw_contours, panel, stack, to_rgb

GRID_ROWS = 6


def _full_res_loader(dm: CamSegDataModule, split: str, keep: Callable[[Item], bool]) -> DataLoader:
    """The items of ``split`` that ``keep`` accepts, at full resolution, in order, in-process."""
    ds = dm.dataset(split, train=False, full_res=True)
    ds.items = [it for it in ds.items if keep(it)]
    return DataLoader(
        ds, batch_size=dm.eval_batch_size, shuffle=False, num_workers=0, collate_fn=collate
    )


@dataclass
class _Pass:
    """What one pass over the training images gathers."""

    metric: SegMetrics
    positives: np.ndarray  # (2, K): [labelled positive, with predicted foreground]
    new_masks: dict[str, Path] = field(default_factory=dict)
    grid_rows: list[np.ndarray] = field(default_factory=list)
    grid_ids: set[str] = field(default_factory=set)  # the figure's rows: one per patient first


@torch.no_grad()
def evaluate_train(
    module: SegmenterModule,
    dm: CamSegDataModule,
    manifest: Manifest,
    out: Path,
    cfg: DictConfig,
    relabel: bool,
) -> tuple[dict[str, float] | None, dict[str, Path], dict[str, dict[str, int]]]:
    """Segmenter vs ground truth on the pseudo-labelled training images (None without ground
    truth), the new confident masks when ``relabel`` (written under ``out/relabel/masks``), and
    per class how many training images labelled positive get any predicted pixel of the class.
    The figure grid goes to ``out/figure_grid.png``."""
    module.eval()
    ids = set(manifest.mask_paths())
    loader = _full_res_loader(dm, "train", lambda it: it.id in ids)
    # Runs on rank 0 alone after training: no sync with the other (finished) ranks.
    acc = _Pass(
        SegMetrics(dm.num_classes, dm.classes, prefix="", sync_on_compute=False),
        np.zeros((2, dm.num_classes), np.int64),
    )
    shown = [s for s in dm.samples("train") if s.id in ids and s.mask and any(s.labels)]
    acc.grid_ids = set(spread_over_patients(shown, GRID_ROWS))
    confidence = float(cfg.seg.get("self_training_confidence", 0.9))
    rows_by_id = {r["id"]: r for r in manifest.samples}
    for batch in loader:
        images = batch["image"].to(module.device)
        for i in range(len(images)):
            h, w = (int(v) for v in batch["orig_size"][i])
            pred, conf = module.full_size_probabilities(images[i : i + 1], h, w)
            warn_large("stage seg", batch["id"][i], h, w, module.max_image_pixels, MAX_PIXELS_KEY)
            _sample(acc, batch, i, pred, conf, dm.num_classes, manifest, rows_by_id)
            if relabel:
                new = relabel_mask(
                    pred.cpu().numpy(), conf.cpu().numpy(), batch["labels"][i], confidence
                )
                path = out / "relabel" / "masks" / f"{batch['id'][i]}.png"
                save_png_atomic(path, new)
                acc.new_masks[batch["id"][i]] = path
    if acc.grid_rows:
        save_png_atomic(out / "figure_grid.png", stack(*acc.grid_rows))
    tally = {
        c: {"positives": int(acc.positives[0, k]), "with_foreground": int(acc.positives[1, k])}
        for k, c in enumerate(dm.classes)
    }
    if acc.metric.update_count == 0:
        return None, acc.new_masks, tally
    values = acc.metric.compute()
    scores = {k: float(values[k]) for k in ("dice", "iou", "sensitivity", "precision")}
    return scores, acc.new_masks, tally


def _sample(
    acc: _Pass,
    batch: dict[str, Any],
    i: int,
    pred: torch.Tensor,
    conf: torch.Tensor,
    num_classes: int,
    manifest: Manifest,
    rows_by_id: dict[str, dict[str, Any]],
) -> None:
    """Tally sample ``i`` of ``batch``: positives, metric and (for a few) a figure row."""
    pred_np = pred.cpu().numpy()
    present = batch["labels"][i].numpy().astype(bool)
    acc.positives[0] += present
    predicted = np.bincount(pred_np.ravel(), minlength=256)[1 : num_classes + 1] > 0
    acc.positives[1] += present & predicted
    gt = batch["mask_full"][i] if bool(batch["has_mask"][i]) else None
    if gt is None:
        return
    acc.metric.update(pred[None].cpu(), gt[None], group_ids([batch["group"][i]]))
    row = rows_by_id.get(batch["id"][i])
    if batch["id"][i] in acc.grid_ids and row and any(row["labels"]) and gt.any():
        acc.grid_rows.append(
            _grid_row(
                batch["image_path"][i],
                manifest,
                row,
                pred_np,
                gt.numpy().astype(np.uint8),
                titled=not acc.grid_rows,  # the first row carries the column titles
            )
        )


def relabel_mask(
    pred: np.ndarray, conf: np.ndarray, labels: torch.Tensor, confidence: float
) -> np.ndarray:
    """A self-training mask from a prediction: classes the image is not labelled with become
    background, pixels below ``confidence`` ignore (255), a negative image all background."""
    present = labels.numpy().astype(bool)
    new = pred.copy()
    absent = np.isin(new, [k + 1 for k in range(len(present)) if not present[k]])
    new[absent] = 0
    new[(conf < confidence) & (new != 0)] = IGNORE_INDEX
    if not present.any():
        new[:] = 0
    return new


def _grid_row(
    image_path: str,
    manifest: Manifest,
    row: dict[str, Any],
    pred: np.ndarray,
    gt: np.ndarray,
    titled: bool = False,
) -> np.ndarray:
    image = to_rgb(read_image(image_path))
    # A figure for people: a large image is drawn at a bounded size (its float heatmap and
    # blend would otherwise cost gigabytes).
    h, w = working_size(image.shape[0], image.shape[1], OVERLAY_MAX_PIXELS)
    image = resize_area(image, h, w)
    pred, gt = resize_nearest(pred, h, w), resize_nearest(gt, h, w)
    cam_path = manifest.root / "cams" / f"{row['id']}.npz"
    if cam_path.is_file():
        cams = np.load(cam_path)["cams"].astype(np.float32)
        labels = np.asarray(row["labels"], dtype=np.float32)
        cam = (cams * labels[:, None, None]).max(axis=0)
        if cam.shape != (h, w):  # CAMs are at the image's (or its working) size
            cam = cv2.resize(cam, (w, h), interpolation=cv2.INTER_LINEAR)
    else:
        cam = np.zeros((h, w), np.float32)
    pseudo = resize_nearest(read_mask(manifest.root / row["mask"]), h, w)
    return panel(
        image,
        cam_overlay(image, cam),
        draw_contours(image, pseudo),
        draw_contours(image, pred),
        draw_contours(image, gt, colour=GT_COLOUR),
        titles=("image", "CAM", "pseudo-mask", "prediction", "truth") if titled else None,
    )


@torch.no_grad()
def write_split_predictions(
    module: SegmenterModule, dm: CamSegDataModule, split: str, out: Path
) -> int:
    """The segmenter's full-size label maps of ``split``'s images with ground truth, as
    ``out/<id>.png`` (what ``seg/predictions/`` holds for the test patients), for the
    case-by-case report. Returns how many were written."""
    module.eval()
    written = 0
    for batch in _full_res_loader(dm, split, lambda it: it.mask is not None):
        images = batch["image"].to(module.device)
        for i in range(len(images)):
            h, w = (int(v) for v in batch["orig_size"][i])
            pred, _ = module.full_size_probabilities(images[i : i + 1], h, w)
            save_png_atomic(out / f"{batch['id'][i]}.png", pred.cpu().numpy().astype(np.uint8))
            written += 1
    return written
