"""Stage 1 runner: train the classifier, keep best/last checkpoints, test on held-out patients."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

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
            raise CamsegError(f"ckpt_path=last: {last} not found; nothing to resume (drop ckpt_path to start fresh)")
        return str(last)
    p = Path(ckpt_path)
    if not p.is_file():
        raise CamsegError(f"ckpt_path={ckpt_path}: file not found")
    return str(p)


def net_config(cfg: DictConfig, dm: CamSegDataModule) -> dict[str, Any]:
    net = OmegaConf.to_container(cfg.model.net, resolve=True)
    assert isinstance(net, dict)
    net["num_classes"] = dm.num_classes
    net["in_channels"] = dm.in_channels
    return net


def run_cls(cfg: DictConfig, run: RunDir) -> dict[str, Any]:
    """Train stage 1 into ``run/cls``; returns the metrics written to ``metrics.json``."""
    out = run.cls
    metrics_path = out / "metrics.json"
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), run.cls_last)
    if metrics_path.is_file() and ckpt_path is None and not cfg.get("force", False):
        log.info("stage cls: already complete (%s); force=true retrains", metrics_path)
        return read_json(metrics_path)
    if ckpt_path is None and run.cls_last.is_file() and not cfg.get("force", False):
        log.info("stage cls: resuming the interrupted run from %s", run.cls_last)
        ckpt_path = str(run.cls_last)

    dm = build_datamodule(cfg)
    dm.setup("fit")
    multilabel = bool(cfg.model.get("multilabel", True))
    if not multilabel:
        bad = [s for s in dm.samples("all") if sum(s.labels) != 1]
        if bad:
            raise DatasetError(
                f"{dm.root}/labels.csv: image '{bad[0].image}' has {sum(bad[0].labels)} positive classes; "
                "model.multilabel=false needs exactly one per image (add a 'normal' class column, or use multilabel=true)"
            )
    ncfg = net_config(cfg, dm)
    if ckpt_path is not None:
        check_compatible(Path(ckpt_path), dm.classes, ncfg)
    net = instantiate(ncfg)
    pos_weight = cfg.model.get("pos_weight")
    if pos_weight == "auto":
        if multilabel:
            f = dm.label_frequencies().clamp(1e-3, 1 - 1e-3)
            pos_weight = ((1 - f) / f).tolist()
        else:
            pos_weight = None
    elif pos_weight is not None:
        pos_weight = list(pos_weight)
        if len(pos_weight) != dm.num_classes:
            raise ConfigError(f"model.pos_weight has {len(pos_weight)} values for {dm.num_classes} classes")
    module = ClassifierModule(
        net=net,
        optimizer=instantiate(cfg.model.optimizer),
        scheduler=instantiate(cfg.model.scheduler) if cfg.model.get("scheduler") else None,
        class_names=dm.classes,
        multilabel=multilabel,
        pos_weight=pos_weight,
        net_config=ncfg,
        channels_last=bool(cfg.model.get("channels_last", False)),
    )
    monitor = str(cfg.model.monitor)
    check_monitor(monitor, module.logged_metric_names(), "model.monitor")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    trainer = build_trainer(cfg, out, max_epochs=int(cfg.model.max_epochs), monitor=monitor, mode=str(cfg.model.monitor_mode))
    t0 = time.time()
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    fit_s = time.time() - t0
    best = run.cls_best if run.cls_best.is_file() else run.cls_last
    val = trainer.validate(module, datamodule=dm, ckpt_path=str(best), verbose=False)
    test = trainer.test(module, datamodule=dm, ckpt_path=str(best), verbose=False)
    metrics = {
        "stage": "cls",
        "classes": dm.classes,
        "monitor": monitor,
        "best_checkpoint": str(best),
        "epochs": int(trainer.current_epoch),
        "global_step": int(trainer.global_step),
        "val": _scalars(val),
        "test": _scalars(test),
        "fit_seconds": round(fit_s, 1),
        "patients": {k: len({s.group for s in v}) for k, v in dm.splits.items()},
        "samples": {k: len(v) for k, v in dm.splits.items()},
    }
    if trainer.is_global_zero:
        write_json_atomic(metrics_path, metrics)
    log.info("stage cls: val/auroc=%.4f test/auroc=%.4f -> %s", metrics["val"].get("val/auroc", float("nan")), metrics["test"].get("test/auroc", float("nan")), out)
    return metrics


def _scalars(results: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in results:
        for k, v in r.items():
            out[k] = float(v)
    return out
