"""A callback that ends the process like ``kill -9`` (for tests/test_resume.py).

Importable through ``PYTHONPATH=tests`` and injected with a Hydra override
``+callbacks.kill._target_=kill_callback.KillAtEpochStart +callbacks.kill.epoch=K``.
"""

from __future__ import annotations

import os

import lightning as L


class KillAtEpochStart(L.Callback):
    """``os._exit(137)`` at the first training batch of epoch ``epoch`` (0-based).

    By then epoch ``epoch - 1`` has ended, its validation ran and ``last.ckpt`` was
    written; nothing is flushed or closed, as with SIGKILL.
    """

    def __init__(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, batch_idx: int
    ) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == 0:
            os._exit(137)
