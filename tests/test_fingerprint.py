"""A finished stage is reused only when the config keys and inputs that shaped it are unchanged;
otherwise it is refused in one line. Stage 2 resumes only samples whose files exist."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from camseg import fingerprint
from camseg.errors import CamsegError
from camseg.fingerprint import ABSENT, Change, Fingerprint
from camseg.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[1]
CAMSEG = str(Path(sys.executable).parent / "camseg")
SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only cost on a loaded machine
    yield
    torch.set_num_threads(before)


def overrides(root: Path, data: Path, *extra: str) -> list[str]:
    return [
        "debug=fast",
        f"paths.root_dir={root}",
        "data=default",
        f"data.root={data}",
        f"data.image_size={SIZE}",
        "data.batch_size=8",
        "model.monitor=val/loss",
        "model.monitor_mode=min",
        "run_name=r",
        *extra,
    ]


def make_cfg(root: Path, data: Path, *extra: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides(root, data, *extra))


def one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, kit) -> Path:  # type: ignore[no-untyped-def]
    base = tmp_path_factory.mktemp("fp_data")
    return kit.write(base / "tiny", kit.tiny_records(patients=6, size=SIZE), ["lesion"])


@pytest.fixture(scope="module")
def kit():  # type: ignore[no-untyped-def]  # the conftest fixture, at module scope
    from conftest import DatasetKit

    return DatasetKit()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    """All three stages, once; tests copy it before changing it."""
    root = tmp_path_factory.mktemp("fp_run")
    run_pipeline(make_cfg(root, data))
    return root


def copy_of(full_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "copy"
    shutil.copytree(full_run, root)
    return root, root / "runs" / "r"


# ------------------------------------------------------------------ the diff itself


def test_diff_names_nested_added_and_removed_keys() -> None:
    old = {"model": {"max_epochs": 1, "net": {"backbone": "resnet18"}}, "seed": 1, "gone": 3}
    new = {"model": {"max_epochs": 2, "net": {"backbone": "resnet18"}}, "seed": 1, "new": [1]}
    assert fingerprint.diff(old, new) == [
        Change("gone", 3, ABSENT),
        Change("model.max_epochs", 1, 2),
        Change("new", ABSENT, [1]),
    ]
    assert fingerprint.diff(old, old) == []
    # Lists are values (compared whole); tuples and lists are the same value.
    assert fingerprint.diff({"s": [1.0, 0.5]}, {"s": (1.0, 0.5)}) == []
    assert fingerprint.diff({"a": {"b": 1}}, {"a.b": 1}) == []  # flattened either way
    text = fingerprint.describe(fingerprint.diff(old, new))
    assert text == "gone: 3 -> (unset), model.max_epochs: 1 -> 2, new: (unset) -> [1]"
    many = [Change(f"k{i}", i, i + 1) for i in range(7)]
    assert fingerprint.describe(many, limit=3) == "k0: 0 -> 1, k1: 1 -> 2, k2: 2 -> 3 and 4 more"


def test_keys_declared_later_with_their_old_behaviour_change_nothing() -> None:
    before = {"seg": {"max_epochs": 1}, "cam": {"method": "cam", "fusion": "mean", "methods": []}}
    after = {"seg": {"max_epochs": 1, "monitor_mode": "auto", "skip_unlabelled": False}}
    after["cam"] = {"method": "cam"}
    assert fingerprint.diff(before, after) == []
    after["seg"]["skip_unlabelled"] = True
    assert fingerprint.diff(before, after) == [Change("seg.skip_unlabelled", ABSENT, True)]


def test_message_names_the_keys_the_upstream_redo_and_the_fix(tmp_path: Path) -> None:
    old = Fingerprint(
        "cls", {"model.max_epochs": 1, "model.scheduler.T_max": 1}, {"labels.csv": "a"}
    )
    longer = Fingerprint(
        "cls", {"model.max_epochs": 2, "model.scheduler.T_max": 2}, {"labels.csv": "a"}
    )
    msg = fingerprint.mismatch_message(tmp_path, old, longer)
    assert msg == (
        f"{tmp_path}: made with other settings (model.max_epochs: 1 -> 2, model.scheduler.T_max: 1 -> 2); "
        "force=true retrains the classifier, ckpt_path=last continues its training, or use another run_name"
    )
    shorter = Fingerprint(
        "cls", {"model.max_epochs": 1, "model.scheduler.T_max": 1, "seed": 2}, old.inputs
    )
    assert "ckpt_path=last" not in (fingerprint.mismatch_message(tmp_path, longer, shorter) or "")
    assert fingerprint.mismatch_message(tmp_path, old, old) is None
    seg_old = Fingerprint("seg", {"seg.lr": 1}, {"pseudo/manifest.json": "1" * 64})
    seg_new = Fingerprint("seg", {"seg.lr": 1}, {"pseudo/manifest.json": "2" * 64})
    assert fingerprint.mismatch_message(tmp_path, seg_old, seg_new) == (
        f"{tmp_path}: made with other inputs (pseudo/manifest.json: 111111111111… -> 222222222222…); "
        "stage pseudo was redone since; force=true retrains the segmenter, or use another run_name"
    )


def test_each_stage_fingerprints_the_keys_that_shape_it(tmp_path: Path, data: Path) -> None:
    cfg = make_cfg(tmp_path, data)
    cls_keys = fingerprint.stage_config("cls", cfg)
    assert cls_keys["model.max_epochs"] == 1 and cls_keys["seed"] == 42
    assert cls_keys["model.scheduler.T_max"] == 1  # resolved
    assert "data.image_size" in cls_keys and "data.split_seed" in cls_keys
    for runtime in (
        "data.num_workers",
        "data.root",
        "trainer.devices",
        "trainer.enable_progress_bar",
    ):
        assert runtime not in cls_keys, runtime
    assert not any(k.startswith(("seg.", "cam.", "pseudo.", "paths.")) for k in cls_keys)
    pseudo_keys = fingerprint.stage_config("pseudo", cfg)
    assert "pseudo.fg_threshold" in pseudo_keys and "cam.scales" in pseudo_keys
    assert "data.predict_split" in pseudo_keys and "trainer.precision" in pseudo_keys
    assert not any(k.startswith(("model.", "seg.")) for k in pseudo_keys)
    for runtime in (
        "pseudo.batch_size",
        "pseudo.overlays",
        "pseudo.on_shortcut",
        "data.train_transforms",
        "seed",
    ):
        assert runtime not in pseudo_keys, runtime
    seg_keys = fingerprint.stage_config("seg", cfg)
    assert "seg.max_epochs" in seg_keys and "seed" in seg_keys
    assert not any(k.startswith(("model.", "pseudo.", "cam.")) for k in seg_keys)


def test_manifest_digest_ignores_where_the_run_lives(tmp_path: Path) -> None:
    m = {
        "camseg_version": "1",
        "run_name": "a",
        "dataset": {"root": "/x", "split": "train"},
        "policy": {"fg_threshold": 0.3},
        "samples": [],
    }
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps(m))
    moved = {
        **m,
        "camseg_version": "2",
        "run_name": "b",
        "dataset": {"root": "/y", "split": "train"},
    }
    b.write_text(json.dumps(moved, indent=1))
    c.write_text(json.dumps({**m, "policy": {"fg_threshold": 0.6}}))
    warned = tmp_path / "warned.json"  # the audit's shortcut warning says nothing about the masks
    warned.write_text(json.dumps({**m, "audit_shortcut": {"flagged": True, "corner": "top-left"}}))
    assert fingerprint.manifest_digest(a) == fingerprint.manifest_digest(warned)
    assert fingerprint.manifest_digest(a) == fingerprint.manifest_digest(b)
    assert fingerprint.manifest_digest(a) != fingerprint.manifest_digest(c)
    assert fingerprint.manifest_digest(tmp_path / "none.json") is None


# ------------------------------------------------------------------ stage 1


def test_finished_classifier_is_refused_with_another_config_reused_with_the_same(
    tmp_path: Path, data: Path
) -> None:
    cls = tmp_path / "runs/r/cls"
    run_pipeline(make_cfg(tmp_path, data, "stages=[cls]"))
    recorded = json.loads((cls / "fingerprint.json").read_text())
    assert recorded["stage"] == "cls" and recorded["config"]["model.max_epochs"] == 1
    assert recorded["inputs"]["labels.csv"] == fingerprint.labels_digest(data)
    best = (cls / "checkpoints/best.ckpt").read_bytes()
    # Unchanged config (and a key that changes no result): reused, nothing retrained.
    run_pipeline(make_cfg(tmp_path, data, "stages=[cls]", "data.num_workers=1"))
    assert (cls / "checkpoints/best.ckpt").read_bytes() == best
    with pytest.raises(CamsegError) as e:
        run_pipeline(make_cfg(tmp_path, data, "stages=[cls]", "model.max_epochs=2"))
    msg = one_line(e)
    assert f"{cls}: made with other settings (model.max_epochs: 1 -> 2" in msg
    assert "force=true retrains the classifier" in msg and "ckpt_path=last continues" in msg
    assert (cls / "checkpoints/best.ckpt").read_bytes() == best
    run_pipeline(make_cfg(tmp_path, data, "stages=[cls]", "model.max_epochs=2", "force=true"))
    assert json.loads((cls / "metrics.json").read_text())["epochs"] == 2
    assert json.loads((cls / "fingerprint.json").read_text())["config"]["model.max_epochs"] == 2
    # Explicit continuation trains on and records the new fingerprint.
    run_pipeline(make_cfg(tmp_path, data, "stages=[cls]", "model.max_epochs=3", "ckpt_path=last"))
    assert json.loads((cls / "metrics.json").read_text())["epochs"] == 3
    assert json.loads((cls / "fingerprint.json").read_text())["config"]["model.max_epochs"] == 3
    run_pipeline(make_cfg(tmp_path, data, "stages=[cls]", "model.max_epochs=3"))  # reused


def test_interrupted_training_resumes_only_with_the_settings_it_was_started_with(
    full_run: Path, tmp_path: Path, data: Path
) -> None:
    root, run = copy_of(full_run, tmp_path)
    for stage in ("cls", "seg"):
        # The state a run killed after its first checkpoint leaves: no metrics.json, and a
        # fingerprint that says the training was started and did not finish.
        (run / stage / "metrics.json").unlink()
        path = run / stage / "fingerprint.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "finished": False}))
    with pytest.raises(CamsegError) as e:
        run_pipeline(make_cfg(root, data, "stages=[cls]", "model.optimizer.lr=0.01"))
    assert one_line(e) == (
        f"{run / 'cls'}: its interrupted run was started with other settings "
        "(model.optimizer.lr: 0.001 -> 0.01); force=true starts over, "
        "ckpt_path=last resumes it with the new ones, or use another run_name"
    )
    with pytest.raises(
        CamsegError,
        match=r"seg: its interrupted run was started with other settings \(seg\.max_epochs: 1 -> 2",
    ):
        run_pipeline(make_cfg(root, data, "stages=[seg]", "seg.max_epochs=2"))
    run_pipeline(make_cfg(root, data, "stages=[cls,seg]"))  # the same settings: resumed
    for stage in ("cls", "seg"):
        assert (run / stage / "metrics.json").is_file()
        assert json.loads((run / stage / "fingerprint.json").read_text())["finished"] is True


def test_cli_refuses_a_changed_finished_stage_in_one_line(
    full_run: Path, tmp_path: Path, data: Path
) -> None:
    root, run = copy_of(full_run, tmp_path)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [CAMSEG, *overrides(root, data, "stages=[cls]", "model.max_epochs=2")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("camseg: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert errors[0] == (
        f"camseg: error: {run / 'cls'}: made with other settings (model.max_epochs: 1 -> 2, "
        "model.scheduler.T_max: 1 -> 2); force=true retrains the classifier, "
        "ckpt_path=last continues its training, or use another run_name"
    )


def test_legacy_stage_without_fingerprint_is_reused_with_a_warning(
    full_run: Path, tmp_path: Path, data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, run = copy_of(full_run, tmp_path)
    for stage in ("cls", "pseudo", "seg"):
        (run / stage / "fingerprint.json").unlink()
    with caplog.at_level("WARNING"):
        run_pipeline(make_cfg(root, data))
    warned = [r.getMessage() for r in caplog.records if "no fingerprint.json" in r.getMessage()]
    assert len(warned) == 3, warned
    assert not any((run / s / "fingerprint.json").exists() for s in ("cls", "pseudo", "seg"))
    assert (
        "Not recorded: made before camseg recorded fingerprints" in (run / "report.md").read_text()
    )


# ------------------------------------------------------------------ stages 2 and 3


def test_segmenter_of_pseudo_masks_redone_since_is_refused(
    full_run: Path, tmp_path: Path, data: Path
) -> None:
    root, run = copy_of(full_run, tmp_path)
    seg_metrics = (run / "seg/metrics.json").read_bytes()
    run_pipeline(make_cfg(root, data, "stages=[pseudo]", "force=true", "pseudo.fg_threshold=0.6"))
    with pytest.raises(CamsegError) as e:
        run_pipeline(make_cfg(root, data, "stages=[seg]"))
    msg = one_line(e)
    assert msg.startswith(f"{run / 'seg'}: made with other inputs (pseudo/manifest.json: ")
    assert msg.endswith(
        "stage pseudo was redone since; force=true retrains the segmenter, or use another run_name"
    )
    assert (run / "seg/metrics.json").read_bytes() == seg_metrics
    # The report (written by the pseudo run) says the segmenter is of the old pseudo-masks,
    # and shows each stage's own recorded settings, not this invocation's.
    report = (run / "report.md").read_text()
    assert (
        "| seg | stale: made from an earlier pseudo/manifest.json (stage pseudo was redone since) |"
        in report
    )
    assert "**Stale**: made from an earlier pseudo/manifest.json" in report
    assert "| pseudo | done |" in report and "pseudo.fg_threshold: 0.6" in report


def test_pseudo_masks_of_a_classifier_redone_since_are_refused(
    full_run: Path, tmp_path: Path, data: Path
) -> None:
    root, run = copy_of(full_run, tmp_path)
    run_pipeline(make_cfg(root, data, "stages=[cls]", "force=true", "seed=1"))
    with pytest.raises(CamsegError) as e:
        run_pipeline(make_cfg(root, data, "stages=[pseudo]"))
    msg = one_line(e)
    assert msg.startswith(f"{run / 'pseudo'}: made with other inputs (cls/checkpoints/best.ckpt: ")
    assert "stage cls was redone since; force=true rebuilds the pseudo-masks" in msg


def test_segmenter_is_not_reused_while_stage_pseudo_is_half_built(
    full_run: Path, tmp_path: Path, data: Path
) -> None:
    root, run = copy_of(full_run, tmp_path)
    # Killed half-way through a rebuild: half the rows and no manifest yet.
    for row in sorted((run / "pseudo/rows").glob("*.json"))[::2]:
        row.unlink()
        (run / "pseudo/masks" / f"{row.stem}.png").unlink()
    (run / "pseudo/manifest.json").unlink()
    with pytest.raises(CamsegError) as e:
        run_pipeline(make_cfg(root, data, "stages=[seg]"))
    assert one_line(e) == (
        f"{run / 'seg'}: stage pseudo is not complete ({run / 'pseudo/manifest.json'} not found), so "
        "the finished segmenter cannot be checked against its pseudo-masks; finish stage pseudo "
        "first (stages=[pseudo,seg])"
    )


def test_deleted_pseudo_mask_is_rewritten_alone_and_the_segmenter_kept(
    full_run: Path, tmp_path: Path, data: Path
) -> None:
    root, run = copy_of(full_run, tmp_path)
    masks = sorted((run / "pseudo/masks").glob("*.png"))
    victim = masks[len(masks) // 2]
    before = victim.read_bytes()
    others = {p: p.stat().st_mtime_ns for p in masks if p != victim}
    victim.unlink()
    with pytest.raises(CamsegError, match=r"stage pseudo is not complete .*is missing"):
        run_pipeline(make_cfg(root, data, "stages=[seg]"))
    run_pipeline(make_cfg(root, data, "stages=[pseudo]"))
    assert victim.read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in others} == others, "only the missing mask is rewritten"
    seg_metrics = (run / "seg/metrics.json").read_bytes()
    run_pipeline(make_cfg(root, data, "stages=[seg]"))  # same pseudo-masks: reused
    assert (run / "seg/metrics.json").read_bytes() == seg_metrics


# ------------------------------------------------------------------ keys that moved


def test_a_segmenter_fingerprinted_before_seg_net_existed_still_matches(
    tmp_path: Path, data: Path
) -> None:
    """Issue 16: ``seg.arch`` & co. moved under ``seg.net`` and the loss became a partial; a
    stage 3 recorded with the flat layout is still recognised as complete."""
    cfg = make_cfg(tmp_path, data, "seg.net.model_kwargs={decoder_channels:[16,8,8,8,8]}")
    current = fingerprint.compute("seg", cfg, {"labels.csv": "a"})
    flat = {
        k: v
        for k, v in current.config.items()
        if not k.startswith(("seg.net.", "seg.loss._target_", "seg.loss._partial_"))
    }
    # What camseg wrote before the move, for the same settings.
    flat |= {
        "seg.arch": "Unet",
        "seg.encoder_name": "resnet18",
        "seg.encoder_weights": None,
        "seg.model_kwargs.decoder_channels": [16, 8, 8, 8, 8],
    }
    stage_dir = tmp_path / "seg"
    stage_dir.mkdir()
    old = Fingerprint("seg", flat, {"labels.csv": "a"}, finished=True)
    (stage_dir / fingerprint.FILENAME).write_text(json.dumps(old.to_json()))
    assert fingerprint.check(stage_dir, current) is True
    # A real change of a moved key is still seen, under its new name.
    fpn = fingerprint.compute("seg", make_cfg(tmp_path, data, "seg=fpn"), {"labels.csv": "a"})
    with pytest.raises(CamsegError) as e:
        fingerprint.check(stage_dir, fpn)
    assert "seg.net.arch: Unet -> FPN" in one_line(e)
    assert "seg.arch" not in one_line(e).replace("seg.net.arch", "")
