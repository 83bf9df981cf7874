"""Trainer, callbacks and loggers built from config for one stage's directory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from camseg.errors import ConfigError
from camseg.utils.io import write_text_atomic

log = logging.getLogger(__name__)


def build_callbacks(cfg: DictConfig, stage_dir: Path, monitor: str | None, mode: str) -> list[L.Callback]:
    callbacks: list[L.Callback] = []
    for name, cb_cfg in (cfg.get("callbacks") or {}).items():
        if cb_cfg is None:
            continue
        kwargs: dict[str, Any] = {}
        if name == "model_checkpoint":
            kwargs = {"dirpath": str(stage_dir / "checkpoints"), "monitor": monitor, "mode": mode}
        elif name == "early_stopping":
            if monitor is None:
                continue
            kwargs = {"monitor": monitor, "mode": mode}
        elif name == "progress_bar" and not cfg.trainer.get("enable_progress_bar", True):
            continue
        callbacks.append(instantiate(cb_cfg, **kwargs))
    return callbacks


def build_loggers(cfg: DictConfig, stage_dir: Path) -> list[Any]:
    loggers = []
    for lg_cfg in (cfg.get("logger") or {}).values():
        if lg_cfg is None:
            continue
        target = str(lg_cfg.get("_target_", ""))
        kw: dict[str, Any] = {}
        if "MLFlow" not in target:
            kw["save_dir"] = str(stage_dir / "logs")
        try:
            loggers.append(instantiate(lg_cfg, **kw))
        except Exception as e:  # missing optional package (wandb, mlflow)
            raise ConfigError(f"logger {target}: cannot be built ({e}); install its package or drop it from logger=") from None
    return loggers


def build_trainer(
    cfg: DictConfig,
    stage_dir: Path,
    max_epochs: int | None = None,
    monitor: str | None = None,
    mode: str = "max",
    callbacks: bool = True,
    loggers: bool = True,
    **overrides: Any,
) -> L.Trainer:
    """``lightning.Trainer`` from ``cfg.trainer`` with this stage's checkpoints and logs."""
    cbs = build_callbacks(cfg, stage_dir, monitor, mode) if callbacks else []
    lgs = build_loggers(cfg, stage_dir) if loggers else False
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer_cfg, dict)
    trainer_cfg = {k: v for k, v in trainer_cfg.items() if v is not None or k == "_target_"}
    if max_epochs is not None:
        trainer_cfg["max_epochs"] = max_epochs
    trainer_cfg.update(overrides)
    if not any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in cbs):
        trainer_cfg.setdefault("enable_checkpointing", False)
    return instantiate(trainer_cfg, callbacks=cbs, logger=lgs, default_root_dir=str(stage_dir))


def save_config(cfg: DictConfig, path: Path) -> None:
    write_text_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))


def check_monitor(monitor: str, logged: list[str], where: str) -> None:
    if monitor not in logged:
        close = [n for n in logged if n.startswith(("val/", "train/"))][:12]
        raise ConfigError(f"{where}='{monitor}' is never logged; choose one of {close} ...")
