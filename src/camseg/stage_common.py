"""The shape every stage runner shares: its data, its resume plan, and fit-then-evaluate.

A training stage (``cls``, ``seg``) is called again on the same run directory in one of
three situations, and :class:`ResumePlan` tells them apart:

* finished (``metrics.json`` present, no ``ckpt_path``, no ``force``): reused after its
  fingerprint is checked against the current config and inputs (:mod:`camseg.fingerprint`);
* interrupted (``checkpoints/last.ckpt`` without ``metrics.json``): resumed from it, unless
  it was started with other settings;
* otherwise trained from scratch, or from the checkpoint ``ckpt_path`` names.

:func:`fit_and_evaluate` then trains and evaluates the best checkpoint (else the last one)
on the validation and test splits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from camseg import fingerprint
from camseg.errors import CamsegError
from camseg.utils.io import read_json, write_json_atomic

if TYPE_CHECKING:
    import lightning as L

    from camseg.data.datamodule import CamSegDataModule

log = logging.getLogger(__name__)

METRICS = "metrics.json"


def build_datamodule(cfg: DictConfig) -> CamSegDataModule:
    """The data module that ``cfg.data`` describes (its own ``_target_``, built here only)."""
    dm: CamSegDataModule = instantiate(cfg.data, _recursive_=False)
    return dm


def resolve_ckpt_path(ckpt_path: str | None, last: Path) -> str | None:
    """``ckpt_path`` as a checked file path: None (start fresh), ``last`` or a path."""
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


def last_checkpoint(stage_dir: Path) -> Path:
    return stage_dir / "checkpoints" / "last.ckpt"


def best_checkpoint(stage_dir: Path) -> Path:
    """``best.ckpt`` of ``stage_dir``, else ``last.ckpt`` (no monitored value was saved)."""
    best = stage_dir / "checkpoints" / "best.ckpt"
    return best if best.is_file() else last_checkpoint(stage_dir)


@dataclass(frozen=True)
class ResumePlan:
    """How a training stage starts in ``out``.

    ``requested``: the checkpoint ``ckpt_path`` names (already resolved), None when unset.
    """

    stage: str
    out: Path
    requested: str | None
    force: bool

    @property
    def metrics_path(self) -> Path:
        return self.out / METRICS

    @property
    def complete(self) -> bool:
        """The stage finished before and nothing asks to train it again."""
        return self.metrics_path.is_file() and self.requested is None and not self.force

    def reuse(self, current: fingerprint.Fingerprint) -> dict[str, Any]:
        """The finished stage's metrics, after refusing one made with other settings or inputs."""
        fingerprint.check(self.out, current)
        log.info(
            "stage %s: already complete (%s); force=true retrains", self.stage, self.metrics_path
        )
        metrics: dict[str, Any] = read_json(self.metrics_path)
        return metrics

    def finish(self, metrics: Mapping[str, Any], current: fingerprint.Fingerprint) -> None:
        """Write the stage's metrics, then mark its fingerprint finished (in that order: a
        finished fingerprint promises the metrics beside it)."""
        write_json_atomic(self.metrics_path, metrics)
        fingerprint.write(self.out, replace(current, finished=True))

    def check_interrupted(self, current: fingerprint.Fingerprint) -> None:
        """Refuse to resume an interrupted training started with other settings or inputs."""
        if self.requested is None and not self.force and any(self.out.glob("**/" + _LAST)):
            fingerprint.check_interrupted(self.out, current)

    def interrupted(self, stage_dir: Path | None = None) -> str | None:
        """``last.ckpt`` of an interrupted training in ``stage_dir`` (default ``out``), to resume
        by itself; None under ``force`` or where nothing was interrupted. (Where ``ckpt_path``
        is set, the caller resumes from it instead.)"""
        stage_dir = self.out if stage_dir is None else stage_dir
        last = last_checkpoint(stage_dir)
        if self.force or not last.is_file() or (stage_dir / METRICS).is_file():
            return None
        return str(last)

    def begin(self, current: fingerprint.Fingerprint) -> None:
        """Training starts: drop ``metrics.json`` and record ``current`` as unfinished."""
        fingerprint.begin(self.out, current, self.metrics_path)


_LAST = "checkpoints/last.ckpt"


def plan_resume(cfg: DictConfig, stage: str, out: Path, may_resume: bool = True) -> ResumePlan:
    """The plan from ``cfg.force`` and ``cfg.ckpt_path`` (ignored where ``may_resume`` is false)."""
    requested = (
        resolve_ckpt_path(cfg.get("ckpt_path"), last_checkpoint(out)) if may_resume else None
    )
    return ResumePlan(stage, out, requested, bool(cfg.get("force", False)))


@dataclass(frozen=True)
class Evaluation:
    """What :func:`fit_and_evaluate` measured: scalars per split, from ``best``."""

    best: Path
    epochs: int
    global_step: int
    val: dict[str, float]
    test: dict[str, float]


def fit_and_evaluate(
    trainer: L.Trainer,
    module: L.LightningModule,
    dm: L.LightningDataModule,
    stage_dir: Path,
    ckpt_path: str | None,
    validate: bool = True,
) -> Evaluation:
    """Train (resuming from ``ckpt_path``), then validate (unless ``validate`` is false) and
    test the best checkpoint of ``stage_dir``, else its last one."""
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    # Read before validate/test, which restore loop state from the best checkpoint.
    epochs, global_step = int(trainer.current_epoch), int(trainer.global_step)
    best = best_checkpoint(stage_dir)
    val = (
        trainer.validate(
            module, datamodule=dm, ckpt_path=str(best), verbose=False, weights_only=True
        )
        if validate
        else []
    )
    test = trainer.test(
        module, datamodule=dm, ckpt_path=str(best), verbose=False, weights_only=True
    )
    return Evaluation(best, epochs, global_step, scalars(val), scalars(test))


def scalars(results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Lightning's per-dataloader result dicts as one flat dict of floats."""
    out: dict[str, float] = {}
    for r in results:
        for k, v in r.items():
            out[k] = float(v)
    return out
