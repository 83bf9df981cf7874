"""Trainer construction: Lightning's cloud-logger advertisement and torch's LeafSpec
FutureWarning are dropped, every other message stays."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from camseg.training import build_trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def trainer_cfg(tmp_path: Path):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=["debug=fast", f"paths.root_dir={tmp_path}", "logger=csv"],
        )


def test_build_trainer_drops_the_litlogger_tip_and_keeps_other_info(
    trainer_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        trainer = build_trainer(trainer_cfg, tmp_path / "stage")
    messages = [r.getMessage() for r in caplog.records]
    assert trainer.loggers, "the csv logger config builds a logger, the condition for the tip"
    assert not [m for m in messages if "litlogger" in m]
    # Lightning's hardware summary still comes through the same logger.
    assert any("GPU available" in m for m in messages), messages


def test_leafspec_future_warning_is_ignored_and_others_are_not(trainer_cfg, tmp_path) -> None:
    from lightning.pytorch.utilities._pytree import _tree_flatten

    build_trainer(trainer_cfg, tmp_path / "stage")
    with warnings.catch_warnings(record=True) as caught:
        _tree_flatten(1)  # builds a LeafSpec, which torch deprecates with a FutureWarning
        warnings.warn("something else", FutureWarning, stacklevel=1)
    texts = [str(w.message) for w in caught]
    assert texts == ["something else"], texts


def test_lightning_messages_are_printed_once_through_the_root_handlers(
    trainer_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # What `import lightning` does: a console handler of its own on the package loggers.
    own = logging.StreamHandler()
    logging.getLogger("lightning").addHandler(own)
    logging.getLogger("lightning.pytorch").propagate = False
    try:
        build_trainer(trainer_cfg, tmp_path / "stage")
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            handlers = logging.getLogger(name).handlers
            assert not [h for h in handlers if type(h) is logging.StreamHandler], name
        with caplog.at_level(logging.INFO):
            logging.getLogger("lightning.pytorch.utilities.rank_zero").info("hello from lightning")
        assert [r.getMessage() for r in caplog.records].count("hello from lightning") == 1
    finally:
        logging.getLogger("lightning").removeHandler(own)
