"""Loggers built from ``conf/logger`` that depend on optional packages."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from lightning.pytorch.loggers import Logger

from camseg.optional import missing_package_message

log = logging.getLogger(__name__)
_warned = False


class NoLogger(Logger):
    """A logger that records nothing: stands in for one whose package is not installed.

    (Lightning's own ``DummyLogger`` answers every attribute, which Hydra's
    ``instantiate`` mistakes for a config when the trainer is built.)
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return ""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def tensorboard_or_nothing(**kwargs: Any) -> Logger:
    """Lightning's ``TensorBoardLogger``, or a :class:`NoLogger` when tensorboard is missing.

    TensorBoard is the extra ``camseg[tensorboard]``; the default logger config also has the
    CSV logger, so a base install keeps its metrics (``logs/csv/metrics.csv``) and says once
    why there are no event files.
    """
    global _warned
    if importlib.util.find_spec("tensorboard") is None:
        if not _warned:
            _warned = True
            log.info(
                "%s; logging to CSV only",
                missing_package_message("tensorboard", "logger.tensorboard"),
            )
        return NoLogger(str(kwargs.get("name", "tensorboard")))
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(**kwargs)
