"""The stage skeleton: which checkpoint a training stage resumes from, and which it evaluates."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from camseg.errors import CamsegError
from camseg.stage_common import (
    ResumePlan,
    best_checkpoint,
    plan_resume,
    resolve_ckpt_path,
    scalars,
)


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_resolve_ckpt_path(tmp_path: Path) -> None:
    last = tmp_path / "checkpoints" / "last.ckpt"
    for unset in (None, "", "null"):
        assert resolve_ckpt_path(unset, last) is None
    with pytest.raises(CamsegError, match=r"^ckpt_path=last: .*last\.ckpt not found; nothing to"):
        resolve_ckpt_path("last", last)
    with pytest.raises(CamsegError, match=r"^ckpt_path=nowhere\.ckpt: file not found$"):
        resolve_ckpt_path("nowhere.ckpt", last)
    touch(last)
    assert resolve_ckpt_path("last", last) == str(last)
    assert resolve_ckpt_path(str(last), last) == str(last)


def test_a_finished_stage_is_complete_unless_force_or_a_checkpoint_asks_to_train(
    tmp_path: Path,
) -> None:
    touch(tmp_path / "metrics.json")
    last = str(touch(tmp_path / "checkpoints" / "last.ckpt"))
    assert ResumePlan("cls", tmp_path, None, force=False).complete
    assert not ResumePlan("cls", tmp_path, None, force=True).complete
    assert not ResumePlan("cls", tmp_path, last, force=False).complete
    assert not ResumePlan("cls", tmp_path / "other", None, force=False).complete


def test_an_interrupted_training_is_resumed_from_its_last_checkpoint(tmp_path: Path) -> None:
    plan = ResumePlan("seg", tmp_path, None, force=False)
    assert plan.interrupted() is None  # nothing trained yet
    last = touch(tmp_path / "round1" / "checkpoints" / "last.ckpt")
    assert plan.interrupted() is None  # another directory's
    assert plan.interrupted(tmp_path / "round1") == str(last)
    assert ResumePlan("seg", tmp_path, None, force=True).interrupted(tmp_path / "round1") is None
    touch(tmp_path / "round1" / "metrics.json")  # that round finished: nothing to resume
    assert plan.interrupted(tmp_path / "round1") is None


def test_plan_from_config(tmp_path: Path) -> None:
    last = touch(tmp_path / "checkpoints" / "last.ckpt")
    cfg = OmegaConf.create({"ckpt_path": "last", "force": False})
    assert plan_resume(cfg, "cls", tmp_path) == ResumePlan("cls", tmp_path, str(last), False)
    # A stage that may not resume (seg inside a run that retrains cls) ignores ckpt_path.
    assert plan_resume(cfg, "seg", tmp_path, may_resume=False).requested is None
    assert plan_resume(OmegaConf.create({"force": True}), "cls", tmp_path).force


def test_best_checkpoint_else_last(tmp_path: Path) -> None:
    last = touch(tmp_path / "checkpoints" / "last.ckpt")
    assert best_checkpoint(tmp_path) == last
    best = touch(tmp_path / "checkpoints" / "best.ckpt")
    assert best_checkpoint(tmp_path) == best


def test_scalars_flattens_lightning_results() -> None:
    assert scalars([{"val/dice": 0.5}, {"val/iou": 1}]) == {"val/dice": 0.5, "val/iou": 1.0}
    assert scalars([]) == {}
