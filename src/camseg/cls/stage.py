"""Stage 1 runner: train the classifier, keep best/last checkpoints, test on held-out patients."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
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
from camseg.training import build_trainer, check_monitor, save_config
from camseg.utils.io import read_json, write_json_atomic

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig) -> CamSegDataModule:
    dm: CamSegDataModule = instantiate(cfg.data, _recursive_=False)
    return dm


def resolve_ckpt_path(ckpt_path: str | None, last: Path) -> str | None:
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        if not last.is_file():
            raise CamsegError(
                f"ckpt_path=last: {last} not found; nothing to resume (drop ckpt_path to start fresh)"
            )
        return str(last)
    p = Path(ckpt_path)
    if not p.is_file():
        raise CamsegError(f"ckpt_path={ckpt_path}: file not found")
    return str(p)


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
    metrics_path = out / "metrics.json"
    force = bool(cfg.get("force", False))
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), run.cls_last)
    multilabel = bool(cfg.model.get("multilabel", True))
    dm = build_datamodule(cfg)
    dm.setup("fit")
    ncfg = net_config(cfg, dm)
    fp = fingerprint.compute("cls", cfg, {fingerprint.LABELS: fingerprint.labels_digest(dm.root)})
    if metrics_path.is_file() and ckpt_path is None and not force:
        done = run.cls_best if run.cls_best.is_file() else run.cls_last
        if done.is_file():  # the finished run must be the one this config describes
            check_compatible(
                done, dm.classes, ncfg, fix="force=true retrains the classifier from scratch"
            )
        fingerprint.check(out, fp)
        log.info("stage cls: already complete (%s); force=true retrains", metrics_path)
        return read_json(metrics_path)
    if ckpt_path is None and run.cls_last.is_file() and not force:
        fingerprint.check_interrupted(out, fp)
        log.info("stage cls: resuming the interrupted run from %s", run.cls_last)
        ckpt_path = str(run.cls_last)
    if not multilabel:
        check_multiclass_labels(dm)
    if ckpt_path is not None:  # read safely and checked before Lightning touches it
        explicit = cfg.get("ckpt_path") not in (None, "", "null")
        label, fix = resume_context(ckpt_path, explicit, "cls")
        check_resumable(check_compatible(Path(ckpt_path), dm.classes, ncfg, label, fix), label)
    try:
        net = instantiate(ncfg)
    except InstantiationException as e:  # e.g. model.net.pretrained refused: keep its one line
        if isinstance(e.__cause__, CamsegError):
            raise e.__cause__ from None
        raise
    module = ClassifierModule(
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
    monitor = str(cfg.model.monitor)
    # Only validation metrics exist when checkpoints and early stopping decide.
    check_monitor(monitor, module.logged_metric_names(["val"]), "model.monitor")
    warn_undefined_monitor(dm, monitor)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    fingerprint.begin(out, fp, metrics_path)
    trainer = build_trainer(
        cfg,
        out,
        max_epochs=int(cfg.model.max_epochs),
        monitor=monitor,
        mode=str(cfg.model.monitor_mode),
        resume=ckpt_path is not None,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    # Read before validate/test, which restore loop state from the best checkpoint.
    epochs, global_step = int(trainer.current_epoch), int(trainer.global_step)
    best = run.cls_best if run.cls_best.is_file() else run.cls_last
    val = trainer.validate(
        module, datamodule=dm, ckpt_path=str(best), verbose=False, weights_only=True
    )
    test = trainer.test(
        module, datamodule=dm, ckpt_path=str(best), verbose=False, weights_only=True
    )
    # Only numbers that a rerun with the same seed reproduces (wall time is in timings.json).
    metrics: dict[str, Any] = {
        "stage": "cls",
        "classes": dm.classes,
        "multilabel": multilabel,
        "monitor": monitor,
        "best_checkpoint": str(best),
        "epochs": epochs,
        "global_step": global_step,
        "val": _scalars(val),
        "test": _scalars(test),
        "patients": {k: len({s.group for s in v}) for k, v in dm.splits.items()},
        "samples": {k: len(v) for k, v in dm.splits.items()},
    }
    if trainer.is_global_zero:
        write_json_atomic(metrics_path, metrics)
        fingerprint.write(out, replace(fp, finished=True))
    log.info(
        "stage cls: val/auroc=%.4f test/auroc=%.4f -> %s",
        metrics["val"].get("val/auroc", float("nan")),
        metrics["test"].get("test/auroc", float("nan")),
        out,
    )
    return metrics


def _scalars(results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in results:
        for k, v in r.items():
            out[k] = float(v)
    return out
