"""Trainer, callbacks and loggers built from config for one stage's directory."""

from __future__ import annotations

import csv
import logging
import random
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from camseg.errors import ConfigError
from camseg.utils.io import write_bytes_atomic, write_text_atomic

log = logging.getLogger(__name__)


class _DropLightningTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip: For seamless cloud logging" not in record.getMessage()


def quiet_third_party() -> None:
    """Drop two messages that say nothing about a camseg run: Lightning's advertisement for
    its cloud logger, and torch's FutureWarning about ``LeafSpec``, an API Lightning itself
    still calls. Idempotent; every other message and warning stays.

    Where the root logger has handlers (the ``camseg`` app: Hydra's console and job log),
    Lightning's own console handlers go too, so that its messages are printed once, in the
    app's format, and also reach the job log; without them Lightning keeps its own.
    """
    if logging.getLogger().handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:
                    logger.removeHandler(handler)
            logger.propagate = True
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningTip) for f in rank_zero.filters):
        rank_zero.addFilter(_DropLightningTip())
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )


class ModelCheckpoint(L.pytorch.callbacks.ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, except that ``last.ckpt`` is written every epoch.

    With a monitor, Lightning (2.6) writes ``last.ckpt`` only in epochs whose score enters
    the top k, so after a plateau ``last.ckpt`` may be many epochs old and
    ``ckpt_path=last`` silently retrains them along another path. Here ``last.ckpt`` is
    the state at the end of the latest epoch, after the best checkpoint and early stopping
    have taken that epoch into account.
    """

    _last_written_step = -1

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_written_step = trainer.global_step

    def _write_last_if_missed(self, trainer: L.Trainer) -> None:
        if (
            not self.save_last
            or getattr(trainer, "fast_dev_run", False)
            or trainer.sanity_checking
            or trainer.state.fn != "fit"
            or self._last_written_step == trainer.global_step
        ):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._write_last_if_missed(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._write_last_if_missed(trainer)


class EpochSeeding(L.Callback):
    """Make each training epoch's randomness a function of (seed, epoch, rank) alone.

    A checkpoint holds weights, optimizer, scheduler and loop counters, but not the random
    generators; a run resumed from ``last.ckpt`` would otherwise draw other dropout masks,
    other worker seeds and (with the DataModule's former ``RandomSampler``) another order.
    At the start of every epoch the training dataset is told the epoch (its augmentations
    are drawn per sample from it) and, at the epoch's first batch, torch, numpy and random
    are reseeded from (seed, epoch, rank). The first batch, not the epoch start: making a
    DataLoader iterator draws from torch's generator, and a persistent worker pool makes
    a new one in the resumed run only. ``seed`` is torch's initial seed when the fit
    starts (``seed_everything``).
    """

    def __init__(self) -> None:
        self.seed: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seed = int(torch.initial_seed()) % 2**63

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _set_dataset_epoch(trainer, trainer.current_epoch)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx != 0 or self.seed is None:
            return
        state = np.random.SeedSequence([self.seed, trainer.current_epoch, trainer.global_rank])
        s32, s64 = state.generate_state(1)[0], state.generate_state(2, np.uint64)[1]
        torch.manual_seed(int(s64) % 2**63)  # all CUDA devices too
        np.random.seed(int(s32))
        random.seed(int(s64))


def _set_dataset_epoch(trainer: L.Trainer, epoch: int) -> None:
    loaders = trainer.train_dataloader
    if loaders is None:
        return
    flat = loaders if isinstance(loaders, list | tuple) else [loaders]
    if isinstance(loaders, dict):
        flat = list(loaders.values())
    for dl in flat:
        set_epoch = getattr(getattr(dl, "dataset", None), "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)


def build_callbacks(
    cfg: DictConfig, stage_dir: Path, monitor: str | None, mode: str, with_loggers: bool = True
) -> list[L.Callback]:
    """``cfg.callbacks`` with this stage's checkpoint directory and monitor filled in.

    Callbacks that cannot work in this trainer are left out rather than failing: early
    stopping without a monitor, the progress bar when ``trainer.enable_progress_bar`` is
    false, and the learning-rate monitor without a logger (Lightning refuses that one).
    """
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
        elif "LearningRateMonitor" in str(cb_cfg.get("_target_", "")) and not with_loggers:
            log.info("callbacks.%s left out: it needs a logger (logger= is empty)", name)
            continue
        callbacks.append(instantiate(cb_cfg, **kwargs))
    return callbacks


def keep_csv_history(logger: Any) -> None:
    """Let a CSVLogger append to the ``metrics.csv`` of the run it resumes.

    Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts, which would
    drop the epochs before the interruption; the file is put back and its header handed to
    the writer, so new rows continue it (TensorBoard keeps its old event files by itself).
    """
    if not isinstance(logger, L.pytorch.loggers.CSVLogger):
        return
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return
    old = path.read_bytes()
    writer = logger.experiment  # created now: this is where the file is deleted
    write_bytes_atomic(path, old)
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    writer.metrics_keys = sorted(header)


def build_loggers(cfg: DictConfig, stage_dir: Path, resume: bool = False) -> list[Any]:
    """``cfg.logger`` writing under ``stage_dir/logs``; ``resume`` continues earlier CSV logs."""
    loggers = []
    for lg_cfg in (cfg.get("logger") or {}).values():
        if lg_cfg is None:
            continue
        target = str(lg_cfg.get("_target_", ""))
        kw: dict[str, Any] = {}
        if "MLFlow" not in target:
            kw["save_dir"] = str(stage_dir / "logs")
        try:
            logger = instantiate(lg_cfg, **kw)
        except Exception as e:  # missing optional package (wandb, mlflow)
            raise ConfigError(
                f"logger {target}: cannot be built ({e}); install its package or drop it from logger="
            ) from None
        if resume:
            keep_csv_history(logger)
        loggers.append(logger)
    return loggers


def build_trainer(
    cfg: DictConfig,
    stage_dir: Path,
    max_epochs: int | None = None,
    monitor: str | None = None,
    mode: str = "max",
    callbacks: bool = True,
    loggers: bool = True,
    resume: bool = False,
    **overrides: Any,
) -> L.Trainer:
    """``lightning.Trainer`` from ``cfg.trainer`` with this stage's checkpoints and logs.

    ``resume``: the fit continues a checkpoint, so logs continue the earlier ones.
    """
    quiet_third_party()
    lgs = build_loggers(cfg, stage_dir, resume=resume) if loggers else []
    cbs = (
        build_callbacks(cfg, stage_dir, monitor, mode, with_loggers=bool(lgs)) if callbacks else []
    )
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer_cfg, dict)
    trainer_cfg = {k: v for k, v in trainer_cfg.items() if v is not None or k == "_target_"}
    if max_epochs is not None:
        trainer_cfg["max_epochs"] = max_epochs
    trainer_cfg.update(overrides)
    if not any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in cbs):
        trainer_cfg.setdefault("enable_checkpointing", False)
    # Always there: a resumed fit draws what the uninterrupted one would have drawn.
    cbs.append(EpochSeeding())
    return instantiate(
        trainer_cfg, callbacks=cbs, logger=lgs or False, default_root_dir=str(stage_dir)
    )


def save_config(cfg: DictConfig, path: Path) -> None:
    write_text_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))


def check_monitor(monitor: str, logged: list[str], where: str) -> None:
    """Refuse a monitor the module never logs, before any training time is spent."""
    if monitor in logged:
        return
    macro = [n for n in logged if "_" not in n.split("/", 1)[-1]] or logged
    raise ConfigError(
        f"{where}='{monitor}' is never logged; choose one of {macro[:12]} "
        "(per-class values: <name>_<class>)"
    )
