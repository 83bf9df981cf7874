"""Stage 1 runner: train the classifier, keep best/last checkpoints, test on held-out patients."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from camseg import fingerprint
from camseg.checkpoints import check_resumable, resume_context
from camseg.cls.checkpoint import check_compatible
from camseg.cls.module import ClassifierModule
from camseg.data.datamodule import CamSegDataModule
from camseg.errors import CamsegError, ConfigError, DatasetError
from camseg.rundir import RunDir
from camseg.stage_common import (
    Evaluation,
    ResumePlan,
    best_checkpoint,
    build_datamodule,
    fit_and_evaluate,
    plan_resume,
)
from camseg.training import build_trainer, check_monitor, save_config

log = logging.getLogger(__name__)


def net_config(cfg: DictConfig, dm: CamSegDataModule) -> dict[str, Any]:
    net = cast("dict[str, Any]", OmegaConf.to_container(cfg.model.net, resolve=True))
    net["num_classes"] = dm.num_classes
    net["in_channels"] = dm.in_channels
    return net


def check_multiclass_labels(dm: CamSegDataModule) -> None:
    """Softmax + CE needs exactly one positive class per image."""
    for s in dm.samples("all"):
        n = sum(s.labels)
        if n != 1:
            raise DatasetError(
                f"{dm.root}/labels.csv: image '{s.image}' has {n} positive classes; "
                "model.multilabel=false needs exactly one per image "
                "(add a 'normal' class column, or use model.multilabel=true)"
            )


def resolve_pos_weight(
    cfg: DictConfig, dm: CamSegDataModule, multilabel: bool
) -> list[float] | None:
    pos_weight = cfg.model.get("pos_weight")
    if pos_weight is None:
        return None
    if pos_weight == "auto":
        if not multilabel:
            return None
        f = dm.label_frequencies().clamp(1e-3, 1 - 1e-3)
        return ((1 - f) / f).tolist()
    if not multilabel:
        raise ConfigError(
            "model.pos_weight applies to multi-label training; set it to null or auto"
        )
    if isinstance(pos_weight, str) or not OmegaConf.is_list(pos_weight):
        raise ConfigError(
            f"model.pos_weight={pos_weight!r}: use auto, null or one number per class {dm.classes}"
        )
    values = [float(v) for v in pos_weight]
    if len(values) != dm.num_classes:
        raise ConfigError(
            f"model.pos_weight has {len(values)} values for the {dm.num_classes} classes {dm.classes}"
        )
    return values


def warn_undefined_monitor(dm: CamSegDataModule, monitor: str) -> None:
    """Say so before training when the monitor cannot be computed on this validation split."""
    key = monitor.split("/", 1)[1].split("_", 1)[0] if "/" in monitor else ""
    if key not in ("auroc", "ap"):
        return
    val = dm.samples("val")
    for k, name in enumerate(dm.classes):
        pos = sum(s.labels[k] for s in val)
        if pos == 0 or (key == "auroc" and pos == len(val)):
            log.warning(
                "model.monitor=%s: the val split (%d images) has %s images of class '%s', so its %s "
                "is undefined (logged as NaN, left out of the macro mean); with too few patients, "
                "monitor val/loss or change data.split_seed / data.val_fraction",
                monitor,
                len(val),
                "no positive" if pos == 0 else "only positive",
                name,
                key,
            )


def run_cls(cfg: DictConfig, run: RunDir) -> dict[str, Any]:
    """Train stage 1 into ``run/cls``; returns the metrics written to ``metrics.json``.

    A finished stage (``metrics.json`` present) is not retrained unless ``force=true``;
    an interrupted one (``last.ckpt`` without ``metrics.json``) resumes by itself, and
    ``ckpt_path=last`` (or a path) continues training, e.g. with a larger ``model.max_epochs``.
    """
    out = run.cls
    plan = plan_resume(cfg, "cls", out)
    multilabel = bool(cfg.model.get("multilabel", True))
    dm = build_datamodule(cfg)
    dm.setup("fit")
    ncfg = net_config(cfg, dm)
    fp = fingerprint.compute("cls", cfg, {fingerprint.LABELS: fingerprint.labels_digest(dm.root)})
    if plan.complete:
        done = best_checkpoint(out)
        if done.is_file():  # the finished run must be the one this config describes
            check_compatible(
                done, dm.classes, ncfg, fix="force=true retrains the classifier from scratch"
            )
        return plan.reuse(fp)
    ckpt_path = _resume_from(plan, fp, dm, ncfg)
    if not multilabel:
        check_multiclass_labels(dm)
    module = _module(cfg, dm, ncfg, multilabel)
    monitor = str(cfg.model.monitor)
    # Only validation metrics exist when checkpoints and early stopping decide.
    check_monitor(monitor, module.logged_metric_names(["val"]), "model.monitor")
    warn_undefined_monitor(dm, monitor)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    plan.begin(fp)
    trainer = build_trainer(
        cfg,
        out,
        max_epochs=int(cfg.model.max_epochs),
        monitor=monitor,
        mode=str(cfg.model.monitor_mode),
        resume=ckpt_path is not None,
    )
    ev = fit_and_evaluate(trainer, module, dm, out, ckpt_path)
    metrics = _metrics(dm, multilabel, monitor, ev)
    if trainer.is_global_zero:
        plan.finish(metrics, fp)
    log.info(
        "stage cls: val/auroc=%.4f test/auroc=%.4f -> %s",
        metrics["val"].get("val/auroc", float("nan")),
        metrics["test"].get("test/auroc", float("nan")),
        out,
    )
    return metrics


def _metrics(
    dm: CamSegDataModule, multilabel: bool, monitor: str, ev: Evaluation
) -> dict[str, Any]:
    """``metrics.json``: only numbers that a rerun with the same seed reproduces (wall time
    is in timings.json)."""
    return {
        "stage": "cls",
        "classes": dm.classes,
        "multilabel": multilabel,
        "monitor": monitor,
        "best_checkpoint": str(ev.best),
        "epochs": ev.epochs,
        "global_step": ev.global_step,
        "val": ev.val,
        "test": ev.test,
        "patients": {k: len({s.group for s in v}) for k, v in dm.splits.items()},
        "samples": {k: len(v) for k, v in dm.splits.items()},
    }


def _resume_from(
    plan: ResumePlan, fp: fingerprint.Fingerprint, dm: CamSegDataModule, ncfg: dict[str, Any]
) -> str | None:
    """The checkpoint training continues from (``ckpt_path``, else an interrupted run's
    ``last.ckpt``), read safely and checked against this config; None to start fresh."""
    ckpt_path = plan.requested
    interrupted = plan.interrupted() if ckpt_path is None else None
    if interrupted is not None:
        plan.check_interrupted(fp)
        log.info("stage cls: resuming the interrupted run from %s", interrupted)
        ckpt_path = interrupted
    if ckpt_path is not None:  # read safely and checked before Lightning touches it
        label, fix = resume_context(ckpt_path, plan.requested is not None, "cls")
        check_resumable(check_compatible(Path(ckpt_path), dm.classes, ncfg, label, fix), label)
    return ckpt_path


def _module(
    cfg: DictConfig, dm: CamSegDataModule, ncfg: dict[str, Any], multilabel: bool
) -> ClassifierModule:
    try:
        net = instantiate(ncfg)
    except InstantiationException as e:  # e.g. model.net.pretrained refused: keep its one line
        if isinstance(e.__cause__, CamsegError):
            raise e.__cause__ from None
        raise
    return ClassifierModule(
        net=net,
        optimizer=instantiate(cfg.model.optimizer),
        scheduler=instantiate(cfg.model.scheduler) if cfg.model.get("scheduler") else None,
        class_names=dm.classes,
        multilabel=multilabel,
        pos_weight=resolve_pos_weight(cfg, dm, multilabel),
        net_config=ncfg,
        channels_last=bool(cfg.model.get("channels_last", False)),
        regulariser=cfg.model.get("regulariser"),
        regulariser_weight=float(cfg.model.get("regulariser_weight", 1.0)),
    )
