"""Stage 3 runner: train the segmenter on the manifest's pseudo-masks, evaluate on ground truth."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from camseg import fingerprint
from camseg.checkpoints import check_resumable, check_segmenter, resume_context
from camseg.cls.stage import build_datamodule, resolve_ckpt_path
from camseg.constants import IGNORE_INDEX
from camseg.data.datamodule import CamSegDataModule, collate
from camseg.errors import ConfigError, ManifestError
from camseg.pseudo.coverage import check_manifest_coverage
from camseg.pseudo.manifest import Manifest, load_manifest
from camseg.rundir import RunDir
from camseg.seg.metrics import SegMetrics, group_ids, output_warnings
from camseg.seg.module import SegmenterModule, build_segmentation_net
from camseg.training import build_trainer, save_config
from camseg.utils.io import read_image, read_json, read_mask, save_png_atomic, write_json_atomic
from camseg.utils.large import (
    OVERLAY_MAX_PIXELS,
    resize_area,
    resize_nearest,
    warn_large,
    working_size,
)
from camseg.utils.overlay import GT_COLOUR, cam_overlay, draw_contours, panel, stack, to_rgb

log = logging.getLogger(__name__)


def check_manifest_masks(
    manifest: Manifest, dm: CamSegDataModule, skip_unlabelled: bool
) -> dict[str, Path]:
    """Mask paths of the training samples, after checking sizes and that each mask labels something."""
    assert dm.index is not None
    by_id = dm.index.by_id()
    train_ids = {s.id for s in dm.samples("train")}
    masks: dict[str, Path] = {}
    skipped = []
    for row in manifest.samples:
        sid = row["id"]
        if sid not in by_id:
            raise ManifestError(
                f"{manifest.path}: sample '{sid}' is not in dataset {dm.root}; the manifest is of another dataset"
            )
        if sid not in train_ids:
            continue
        mpath = manifest.root / row["mask"]
        with Image.open(mpath) as m, Image.open(dm.index.path(by_id[sid].image)) as im:
            if m.size != im.size:
                raise ManifestError(
                    f"{mpath}: pseudo-mask is {m.size[0]}x{m.size[1]} but image '{by_id[sid].image}' is {im.size[0]}x{im.size[1]}; "
                    "re-run stage pseudo (force=true)"
                )
        if row.get("ignore_fraction", 0.0) >= 1.0:
            if not skip_unlabelled:
                raise ManifestError(
                    f"{mpath}: mask of '{sid}' is all ignore (255) and teaches nothing; lower pseudo.bg_threshold, "
                    "or set seg.skip_unlabelled=true to leave such samples out"
                )
            skipped.append(sid)
            continue
        masks[sid] = mpath
    if skipped:
        log.warning(
            "stage seg: %d all-ignore pseudo-masks left out (e.g. %s)", len(skipped), skipped[0]
        )
    if not masks:
        raise ManifestError(f"{manifest.path}: no training sample with a usable pseudo-mask")
    return masks


def monitor_and_mode(seg: DictConfig, val_has_gt: bool) -> tuple[str, str]:
    """``seg.monitor`` and ``seg.monitor_mode`` with ``auto`` resolved: the validation Dice when
    validation has ground truth, else the training loss; min for a loss, else max."""
    monitor = str(seg.get("monitor", "auto"))
    if monitor == "auto":
        monitor = "val/dice" if val_has_gt else "train/loss_epoch"
    mode = str(seg.get("monitor_mode", "auto"))
    if mode == "auto":
        mode = "min" if "loss" in monitor else "max"
    if mode not in ("min", "max"):
        raise ConfigError(f"seg.monitor_mode={mode}: use auto, min or max")
    return monitor, mode


def _module(cfg: DictConfig, dm: CamSegDataModule, out: Path) -> SegmenterModule:
    s = cfg.seg
    net_cfg = {
        "arch": str(s.arch),
        "encoder_name": str(s.encoder_name),
        "encoder_weights": s.get("encoder_weights"),
        "in_channels": dm.in_channels,
        "num_classes": dm.num_classes,
        "model_kwargs": OmegaConf.to_container(s.model_kwargs, resolve=True)
        if s.get("model_kwargs")
        else {},
    }
    data_cfg = {
        "image_size": dm.image_size,
        "in_channels": dm.in_channels,
        "context_slices": dm.context_slices,
        "mean": list(dm.mean),
        "std": list(dm.std),
    }
    module = SegmenterModule(
        net=build_segmentation_net(**net_cfg),
        class_names=dm.classes,
        loss=OmegaConf.to_container(s.loss, resolve=True),  # type: ignore[arg-type]
        optimizer=instantiate(s.optimizer),
        scheduler=instantiate(s.scheduler) if s.get("scheduler") else None,
        net_config=net_cfg,
        data_config=data_cfg,
        predictions_dir=str(out),
        overlays=int(s.get("overlays", 16)),
        channels_last=bool(s.get("channels_last", False)),
    )
    module.max_image_pixels = dm.max_image_pixels
    return module


def run_seg(cfg: DictConfig, run: RunDir) -> dict[str, Any]:
    """Train stage 3 (``seg.rounds`` rounds) into ``run/seg``; returns ``metrics.json``'s content."""
    out = run.seg
    metrics_path = out / "metrics.json"
    ckpt_path = (
        resolve_ckpt_path(cfg.get("ckpt_path"), run.seg_last)
        if "seg" in list(cfg.stages) and "cls" not in list(cfg.stages)
        else None
    )
    force = bool(cfg.get("force", False))
    if metrics_path.is_file() and ckpt_path is None and not force:
        fingerprint.check_upstream_complete(run.manifest, out)
        fingerprint.check(
            out, fingerprint.compute("seg", cfg, fingerprint.seg_inputs(cfg, run.manifest))
        )
        log.info("stage seg: already complete (%s); force=true retrains", metrics_path)
        return read_json(metrics_path)
    run.require(run.manifest, "pseudo")
    dm = build_datamodule(cfg)
    dm.setup("fit")
    if cfg.seg.get("batch_size"):
        dm.batch_size = int(cfg.seg.batch_size)
    manifest = load_manifest(
        run.manifest,
        checkpoint=run.cls_best if run.cls_best.exists() else None,
        dataset_root=dm.root,
        classes=dm.classes,
    )
    masks = check_manifest_masks(manifest, dm, bool(cfg.seg.skip_unlabelled))
    fp = fingerprint.compute("seg", cfg, fingerprint.seg_inputs(cfg, run.manifest))
    check_manifest_coverage(manifest, masks, cfg.pseudo.get("min_positive_coverage", 0.0))
    val_has_gt = any(s.mask for s in dm.samples("val"))
    monitor, mode = monitor_and_mode(cfg.seg, val_has_gt)
    log.info(
        "stage seg: best checkpoint by %s (%s)",
        monitor,
        "validation patients have ground-truth masks"
        if val_has_gt
        else "no ground truth in validation: loss on pseudo-masks",
    )
    rounds = int(cfg.seg.get("rounds", 1))
    if rounds < 1:
        raise ConfigError(f"seg.rounds={rounds}: must be >= 1")
    devices = cfg.trainer.get("devices", 1)
    if rounds > 1 and (
        int(cfg.trainer.get("num_nodes", 1)) > 1 or (isinstance(devices, int) and devices > 1)
    ):
        raise ConfigError(
            "seg.rounds > 1 (self-training) runs on one device; use trainer.devices=1 or seg.rounds=1"
        )
    if ckpt_path is None and not force and any(out.glob("**/checkpoints/last.ckpt")):
        fingerprint.check_interrupted(out, fp)
    fingerprint.begin(out, fp, metrics_path)
    history: list[dict[str, Any]] = []
    for r in range(1, rounds + 1):
        stage_dir = out if r == rounds else out / f"round{r}"
        dm.train_masks = masks
        dm.full_res_eval = True
        module = _module(cfg, dm, stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, stage_dir / "config.yaml")
        resume = ckpt_path if r == rounds else None
        if (
            resume is None
            and (stage_dir / "checkpoints" / "last.ckpt").is_file()
            and not (stage_dir / "metrics.json").is_file()
            and not force
        ):
            resume = str(stage_dir / "checkpoints" / "last.ckpt")
            log.info("stage seg: resuming round %d from %s", r, resume)
        trainer = build_trainer(
            cfg,
            stage_dir,
            max_epochs=int(cfg.seg.max_epochs),
            monitor=monitor,
            mode=mode,
            resume=resume is not None,
        )
        if resume is not None:  # read safely and checked before Lightning touches it
            label, fix = resume_context(resume, resume == ckpt_path, "seg")
            ckpt = check_segmenter(resume, module.hparams["net_config"], dm.classes, label, fix)
            check_resumable(ckpt, label)
        trainer.fit(module, datamodule=dm, ckpt_path=resume, weights_only=True)
        best = stage_dir / "checkpoints" / "best.ckpt"
        if not best.is_file():
            best = stage_dir / "checkpoints" / "last.ckpt"
        val = (
            trainer.validate(
                module, datamodule=dm, ckpt_path=str(best), verbose=False, weights_only=True
            )
            if val_has_gt
            else [{}]
        )
        test = trainer.test(
            module, datamodule=dm, ckpt_path=str(best), verbose=False, weights_only=True
        )
        if not trainer.is_global_zero:
            return {}
        train_cmp, relabel, positives = evaluate_train(
            module, dm, manifest, stage_dir, cfg, relabel=r < rounds
        )
        result: dict[str, Any] = {
            "stage": "seg",
            "round": r,
            "arch": str(cfg.seg.arch),
            "encoder": str(cfg.seg.encoder_name),
            "monitor": monitor,
            "best_checkpoint": str(best),
            "epochs": int(trainer.current_epoch),
            "val": {k: float(v) for k, v in val[0].items()},
            "test": {k: float(v) for k, v in test[0].items()},
            "train_pseudo_vs_seg": train_cmp,
            "train_positives_with_foreground": positives,
        }
        history.append(result)
        if r < rounds:
            write_json_atomic(stage_dir / "metrics.json", result)
            masks = relabel
            log.info(
                "stage seg: round %d test Dice %.4f; relabelled %d training images",
                r,
                result["test"].get("test/dice", float("nan")),
                len(masks),
            )
    final = dict(history[-1])
    if rounds > 1:
        final["rounds"] = [
            {
                "round": h["round"],
                monitor: h["val"].get(monitor),
                "test/dice": h["test"].get("test/dice"),
            }
            for h in history
        ]
        chosen = best_round(final["rounds"], monitor, mode)
        if chosen is not None:
            final["best_round_by_val"] = chosen
            if chosen != rounds:
                log.warning(
                    "stage seg: self-training did not help on validation: round %d has the best %s "
                    "(%.4f vs %.4f in the last round); its model is %s; seg.rounds=%d would keep it",
                    chosen,
                    monitor,
                    final["rounds"][chosen - 1][monitor],
                    final["rounds"][-1][monitor],
                    out / f"round{chosen}" / "checkpoints" / "best.ckpt",
                    chosen,
                )
    final["warnings"] = output_warnings(
        {"val": final["val"], "test": final["test"]},
        dm.classes,
        final["train_positives_with_foreground"],
    )
    for w in final["warnings"]:
        log.warning("stage seg: WARNING: %s", w)
    write_json_atomic(metrics_path, final)
    fingerprint.write(out, replace(fp, finished=True))
    log.info(
        "stage seg: test Dice %.4f IoU %.4f -> %s",
        final["test"].get("test/dice", float("nan")),
        final["test"].get("test/iou", float("nan")),
        out,
    )
    return final


def best_round(rounds: list[dict[str, Any]], monitor: str, mode: str) -> int | None:
    """The round whose validation ``monitor`` is best (the earliest on a tie); None where
    a round has no finite value (no ground truth in validation)."""
    values: list[float] = []
    for r in rounds:
        v = r.get(monitor)
        if v is None or not math.isfinite(v):
            return None
        values.append(float(v))
    target = max(values) if mode == "max" else min(values)
    return int(rounds[values.index(target)]["round"])


@torch.no_grad()
def evaluate_train(
    module: SegmenterModule,
    dm: CamSegDataModule,
    manifest: Manifest,
    out: Path,
    cfg: DictConfig,
    relabel: bool,
) -> tuple[dict[str, float] | None, dict[str, Path], dict[str, dict[str, int]]]:
    """Segmenter vs ground truth on the pseudo-labelled training images (the "pseudo-masks alone vs
    segmenter" comparison), the figure grid, for self-training new confident masks, and per class
    how many training images labelled positive get any predicted pixel of the class."""
    device = module.device
    module.eval()
    ids = set(manifest.mask_paths())
    ds = dm.dataset("train", train=False, full_res=True)
    ds.items = [it for it in ds.items if it.id in ids]
    loader = DataLoader(
        ds, batch_size=dm.eval_batch_size, shuffle=False, num_workers=0, collate_fn=collate
    )
    # Runs on rank 0 alone after training: no sync with the other (finished) ranks.
    metric = SegMetrics(dm.num_classes, dm.classes, prefix="", sync_on_compute=False)
    confidence = float(cfg.seg.get("self_training_confidence", 0.9))
    new_masks: dict[str, Path] = {}
    grid_rows: list[np.ndarray] = []
    want_grid = 6
    rows_by_id = {r["id"]: r for r in manifest.samples}
    positives = np.zeros((2, dm.num_classes), np.int64)  # [labelled positive, with foreground]
    for batch in loader:
        images = batch["image"].to(device)
        for i in range(len(images)):
            h, w = (int(v) for v in batch["orig_size"][i])
            pred, conf = module.full_size_probabilities(images[i : i + 1], h, w)
            if module.max_image_pixels and h * w > module.max_image_pixels:
                warn_large(
                    "stage seg",
                    batch["id"][i],
                    h,
                    w,
                    module.max_image_pixels,
                    "data.max_image_pixels",
                )
            pred_np = pred.cpu().numpy()
            sid = batch["id"][i]
            present = batch["labels"][i].numpy().astype(bool)
            positives[0] += present
            predicted = np.bincount(pred_np.ravel(), minlength=256)[1 : dm.num_classes + 1] > 0
            positives[1] += present & predicted
            gt = batch["mask_full"][i] if bool(batch["has_mask"][i]) else None
            if gt is not None:
                metric.update(pred[None].cpu(), gt[None], group_ids([batch["group"][i]]))
            if relabel:
                labels = batch["labels"][i].numpy().astype(bool)
                new = pred_np.copy()
                absent = np.isin(new, [k + 1 for k in range(len(labels)) if not labels[k]])
                new[absent] = 0
                new[(conf.cpu().numpy() < confidence) & (new != 0)] = IGNORE_INDEX
                if not labels.any():
                    new[:] = 0
                path = out / "relabel" / "masks" / f"{sid}.png"
                save_png_atomic(path, new)
                new_masks[sid] = path
            row = rows_by_id.get(sid)
            if (
                gt is not None
                and len(grid_rows) < want_grid
                and row
                and any(row["labels"])
                and gt.any()
            ):
                grid_rows.append(
                    _grid_row(
                        batch["image_path"][i],
                        manifest,
                        row,
                        pred_np,
                        gt.numpy().astype(np.uint8),
                        titled=not grid_rows,  # the first row carries the column titles
                    )
                )
    if grid_rows:
        save_png_atomic(out / "figure_grid.png", stack(*grid_rows))
    tally = {
        c: {"positives": int(positives[0, k]), "with_foreground": int(positives[1, k])}
        for k, c in enumerate(dm.classes)
    }
    if metric.update_count == 0:
        return None, new_masks, tally
    values = metric.compute()
    scores = {k: float(values[k]) for k in ("dice", "iou", "sensitivity", "precision")}
    return scores, new_masks, tally


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
