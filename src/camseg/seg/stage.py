"""Stage 3 runner: train the segmenter on the manifest's pseudo-masks, evaluate on ground truth."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from torch import nn

from camseg import fingerprint
from camseg.checkpoints import check_resumable, check_segmenter, resume_context
from camseg.data.datamodule import CamSegDataModule
from camseg.errors import ConfigError, ManifestError
from camseg.models.segmenter import build_segmentation_net
from camseg.pseudo.coverage import check_manifest_coverage
from camseg.pseudo.manifest import Manifest, load_manifest
from camseg.rundir import RunDir
from camseg.seg.cases import VAL_PREDICTIONS, spread_over_patients
from camseg.seg.metrics import output_warnings
from camseg.seg.module import SegmenterModule
from camseg.seg.train_eval import evaluate_train, write_split_predictions
from camseg.stage_common import (
    METRICS,
    ResumePlan,
    build_datamodule,
    fit_and_evaluate,
    plan_resume,
)
from camseg.training import build_trainer, save_config
from camseg.utils.io import write_json_atomic

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
                    f"{mpath}: mask of '{sid}' is all ignore (255) and teaches nothing; lower pseudo.bg_threshold "
                    "(pseudo.affinity.min_share after affinity refinement), or set "
                    "seg.skip_unlabelled=true to leave such samples out"
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


def net_factory(cfg: DictConfig) -> tuple[Callable[..., nn.Module], dict[str, Any]]:
    """``seg.net`` instantiated (a partial of ``build_segmentation_net``) and the record of its
    arguments that a checkpoint stores (``net_config`` less the data-given ``in_channels``
    and ``num_classes``). Only camseg's builder is accepted: a checkpoint must be rebuildable
    from its plain record, without calling a ``_target_``."""
    try:
        factory = instantiate(cfg.seg.net, _convert_="all")
    except InstantiationException as e:
        raise ConfigError(f"seg.net: {str(e).strip().splitlines()[0]}") from None
    if getattr(factory, "func", None) is not build_segmentation_net:
        raise ConfigError(
            f"seg.net._target_={cfg.seg.net.get('_target_')}: stage 3 builds its network with "
            "camseg.models.segmenter.build_segmentation_net (_partial_: true), the one a "
            "checkpoint can be rebuilt with"
        )
    return factory, dict(factory.keywords)


def _module(cfg: DictConfig, dm: CamSegDataModule, out: Path) -> SegmenterModule:
    s = cfg.seg
    factory, kwargs = net_factory(cfg)
    data_given = {"in_channels": dm.in_channels, "num_classes": dm.num_classes}
    net_cfg = {**kwargs, **data_given, "model_kwargs": kwargs.get("model_kwargs") or {}}
    data_cfg = {
        "image_size": dm.image_size,
        "in_channels": dm.in_channels,
        "context_slices": dm.context_slices,
        "mean": list(dm.mean),
        "std": list(dm.std),
    }
    module = SegmenterModule(
        net=factory(**data_given),
        class_names=dm.classes,
        loss=instantiate(s.loss, _convert_="all")(num_classes=dm.num_classes),
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


@dataclass
class _Job:
    """What every round of stage 3 trains and is judged on."""

    dm: CamSegDataModule
    manifest: Manifest
    masks: dict[str, Path]  # training pseudo-masks by sample id
    val_has_gt: bool
    monitor: str
    mode: str
    rounds: int


def run_seg(cfg: DictConfig, run: RunDir) -> dict[str, Any]:
    """Train stage 3 (``seg.rounds`` rounds) into ``run/seg``; returns ``metrics.json``'s content."""
    out = run.seg
    stages = list(cfg.stages)
    plan = plan_resume(cfg, "seg", out, may_resume="seg" in stages and "cls" not in stages)
    if plan.complete:
        fingerprint.check_upstream_complete(run.manifest, out)
        return plan.reuse(
            fingerprint.compute("seg", cfg, fingerprint.seg_inputs(cfg, run.manifest))
        )
    job = _prepare(cfg, run)
    fp = fingerprint.compute("seg", cfg, fingerprint.seg_inputs(cfg, run.manifest))
    plan.check_interrupted(fp)
    plan.begin(fp)
    history: list[dict[str, Any]] = []
    masks = job.masks
    for r in range(1, job.rounds + 1):
        trained = _train_round(cfg, job, plan, r, masks)
        if trained is None:  # not rank 0: the metrics and the next round are rank 0's
            return {}
        result, relabelled = trained
        history.append(result)
        if r < job.rounds:
            write_json_atomic(out / f"round{r}" / METRICS, result)
            masks = relabelled
            log.info(
                "stage seg: round %d test Dice %.4f; relabelled %d training images",
                r,
                result["test"].get("test/dice", float("nan")),
                len(masks),
            )
    final = _final(history, job, out)
    plan.finish(final, fp)
    log.info(
        "stage seg: test Dice %.4f IoU %.4f -> %s",
        final["test"].get("test/dice", float("nan")),
        final["test"].get("test/iou", float("nan")),
        out,
    )
    return final


def _prepare(cfg: DictConfig, run: RunDir) -> _Job:
    """Data, manifest and pseudo-masks checked, and the checkpoint monitor, before training."""
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
    return _Job(dm, manifest, masks, val_has_gt, monitor, mode, rounds)


def _train_round(
    cfg: DictConfig, job: _Job, plan: ResumePlan, r: int, masks: dict[str, Path]
) -> tuple[dict[str, Any], dict[str, Path]] | None:
    """Round ``r`` on ``masks``: its metrics and, before the last round, its new masks.
    None on ranks other than 0. The last round trains in the stage directory itself."""
    dm = job.dm
    stage_dir = plan.out if r == job.rounds else plan.out / f"round{r}"
    dm.train_masks = masks
    dm.full_res_eval = True
    module = _module(cfg, dm, stage_dir)
    module.overlay_ids = set(spread_over_patients(dm.samples("test"), module.overlays))
    stage_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, stage_dir / "config.yaml")
    resume = plan.requested if r == job.rounds else None
    if resume is None and (resume := plan.interrupted(stage_dir)) is not None:
        log.info("stage seg: resuming round %d from %s", r, resume)
    trainer = build_trainer(
        cfg,
        stage_dir,
        max_epochs=int(cfg.seg.max_epochs),
        monitor=job.monitor,
        mode=job.mode,
        resume=resume is not None,
    )
    if resume is not None:  # read safely and checked before Lightning touches it
        label, fix = resume_context(resume, resume == plan.requested, "seg")
        ckpt = check_segmenter(resume, module.hparams["net_config"], dm.classes, label, fix)
        check_resumable(ckpt, label)
    ev = fit_and_evaluate(trainer, module, dm, stage_dir, resume, validate=job.val_has_gt)
    if not trainer.is_global_zero:
        return None
    train_cmp, relabelled, positives = evaluate_train(
        module, dm, job.manifest, stage_dir, cfg, relabel=r < job.rounds
    )
    if r == job.rounds and job.val_has_gt:  # the validation patients' cases, for the report
        write_split_predictions(module, dm, "val", stage_dir / VAL_PREDICTIONS)
    result: dict[str, Any] = {
        "stage": "seg",
        "round": r,
        "arch": str(cfg.seg.net.arch),
        "encoder": str(cfg.seg.net.encoder_name),
        "monitor": job.monitor,
        "best_checkpoint": str(ev.best),
        "epochs": ev.epochs,
        "val": ev.val,
        "test": ev.test,
        "train_pseudo_vs_seg": train_cmp,
        "train_positives_with_foreground": positives,
    }
    return result, relabelled


def _final(history: list[dict[str, Any]], job: _Job, out: Path) -> dict[str, Any]:
    """The last round's metrics, with every round's scores and the output warnings."""
    final = dict(history[-1])
    monitor, rounds = job.monitor, job.rounds
    if rounds > 1:
        final["rounds"] = [
            {
                "round": h["round"],
                monitor: h["val"].get(monitor),
                "test/dice": h["test"].get("test/dice"),
            }
            for h in history
        ]
        chosen = best_round(final["rounds"], monitor, job.mode)
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
        job.dm.classes,
        final["train_positives_with_foreground"],
    )
    for w in final["warnings"]:
        log.warning("stage seg: WARNING: %s", w)
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
