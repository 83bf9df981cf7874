"""A checkpoint never executes code (issue 11 §1), and a bad one is refused in one line (§5).

Two kinds of hostile file are thrown at every entry point that reads a checkpoint:

- a malicious pickle: an object whose ``__reduce__`` touches a marker file when unpickled;
- a malicious ``_target_``: a checkpoint that loads with ``weights_only=True`` but whose
  stored ``net_config`` names a callable (here a nested ``shutil.copyfile`` node, which
  Hydra's recursive ``instantiate`` would call) that would create the marker.

Every test asserts that the marker is never created and that the refusal is one line
(``camseg: error: ...`` and exit status 2 for the command-line tools).
"""

from __future__ import annotations

import os
import pathlib
import re
import runpy
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from camseg.checkpoints import CheckpointError, load_checkpoint
from camseg.cls.checkpoint import check_compatible, load_classifier
from camseg.errors import CamsegError
from camseg.models.classifier import CamClassifier
from camseg.models.segmenter import build_segmentation_net
from camseg.pipeline import run_pipeline
from camseg.predict import Segmenter

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
DATA = (
    "debug=fast",
    "data.synthetic.patients=6",
    "data.synthetic.slices_per_patient=3",
    f"data.synthetic.size={SIZE}",
    f"data.image_size={SIZE}",
    "seg.net.encoder_name=resnet18",
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- hostile and damaged files ---------------------------------------------------------------


class _TouchOnLoad:
    """Unpickling this calls ``pathlib.Path.touch(marker)``: code run by loading a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def evil_pickle(path: Path, marker: Path) -> Path:
    """A file laid out like a camseg checkpoint whose hyper-parameters run code when unpickled."""
    torch.save({"state_dict": {}, "hyper_parameters": _TouchOnLoad(marker)}, path)
    return path


def classifier_config(num_classes: int = 1, in_channels: int = 1) -> dict[str, Any]:
    return {
        "_target_": "camseg.models.classifier.CamClassifier",
        "backbone": "resnet18",
        "source": "torchvision",
        "output_stride": 32,
        "pretrained": False,
        "dropout": 0.0,
        "num_classes": num_classes,
        "in_channels": in_channels,
    }


def classifier_checkpoint(
    path: Path, net_config: dict[str, Any] | None = None, class_names: list[str] | None = None
) -> Path:
    """A camseg stage-1 checkpoint (weights, hyper-parameters, Lightning's resume state)."""
    cfg = classifier_config()
    net = CamClassifier(**{k: v for k, v in cfg.items() if k != "_target_"})
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "hyper_parameters": {
                "class_names": class_names or ["hemorrhage"],
                "multilabel": True,
                "net_config": net_config if net_config is not None else cfg,
            },
            "loops": {},
            "optimizer_states": [],
        },
        path,
    )
    return path


def evil_target(path: Path, marker: Path, top_level: bool = False) -> Path:
    """Loads with ``weights_only=True``; its ``net_config`` names ``shutil.copyfile``, which
    would copy this very file onto ``marker`` if anything instantiated it."""
    copy = {"_target_": "shutil.copyfile", "src": str(path), "dst": str(marker)}
    cfg = classifier_config()
    if top_level:
        cfg = {**copy, "num_classes": 1}
    else:
        cfg["backbone"] = copy  # a nested node: Hydra instantiates it before the outer target
    return classifier_checkpoint(path, cfg)


def segmenter_checkpoint(path: Path, resumable: bool = False, **net: Any) -> Path:
    net_cfg = {
        "arch": "Unet",
        "encoder_name": "resnet18",
        "encoder_weights": None,
        "in_channels": 1,
        "num_classes": 1,
        **net,
    }
    model = build_segmentation_net(**{k: v for k, v in net_cfg.items() if k != "_target_"})
    ckpt: dict[str, Any] = {
        "state_dict": {f"net.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {
            "net_config": net_cfg,
            "data_config": {
                "image_size": SIZE,
                "in_channels": 1,
                "context_slices": 0,
                "mean": [0.5],
                "std": [0.25],
            },
            "class_names": ["hemorrhage"],
        },
    }
    if resumable:
        ckpt.update(loops={}, optimizer_states=[])
    torch.save(ckpt, path)
    return path


def damaged(path: Path, how: str, good: Path) -> Path:
    data = good.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # not a torch file at all
        path.write_text("epoch: 3\nstate_dict: {}\n")
    return path


DAMAGE_MESSAGES = {
    "empty": "empty file (0 bytes), not a checkpoint",
    "truncated": "truncated or corrupt checkpoint",
    "text": "not a torch checkpoint",
}


def assert_one_line(text: str) -> None:
    assert "\n" not in text.strip(), text
    assert "Traceback" not in text


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "a checkpoint ran code"


# --- every loader, called directly -----------------------------------------------------------


LOADERS = {
    "load_classifier": lambda p: load_classifier(p),
    "check_compatible": lambda p: check_compatible(p, ["hemorrhage"]),
    "Segmenter.load": lambda p: Segmenter.load(p, "cpu"),
    "model.net.pretrained": lambda p: CamClassifier(1, "resnet18", "torchvision", 1, 32, str(p)),
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_a_malicious_pickle_is_refused_unrun_by_every_loader(
    loader: str, tmp_path: Path, marker: Path
) -> None:
    path = evil_pickle(tmp_path / "evil.ckpt", marker)
    with pytest.raises(CamsegError, match=r"refused: its pickle names getattr") as e:
        LOADERS[loader](path)
    assert_one_line(str(e.value))
    assert str(path) in str(e.value)


@pytest.mark.parametrize("top_level", [False, True], ids=["nested", "top_level"])
@pytest.mark.parametrize("loader", ["load_classifier", "check_compatible"])
def test_a_stored_target_is_never_instantiated(
    loader: str, top_level: bool, tmp_path: Path, marker: Path
) -> None:
    path = evil_target(tmp_path / "target.ckpt", marker, top_level)
    with pytest.raises(CheckpointError) as e:
        LOADERS[loader](path)
    assert_one_line(str(e.value))
    msg = str(e.value)
    if top_level:
        assert "refused: net_config._target_='shutil.copyfile'" in msg
    else:
        assert "refused: net_config.backbone._target_='shutil.copyfile'" in msg


def test_a_stored_target_as_pretrained_weights_is_read_for_its_tensors_only(
    tmp_path: Path, marker: Path
) -> None:
    path = evil_target(tmp_path / "target.ckpt", marker)
    CamClassifier(1, "resnet18", "torchvision", 1, 32, str(path))


def test_a_segmenter_config_outside_the_whitelist_is_refused(tmp_path: Path) -> None:
    for extra, why in (
        ({"_target_": "shutil.copyfile"}, r"keys camseg does not build from \(_target_\)"),
        (
            {"model_kwargs": {"aux_params": {"_target_": "os.system", "command": "true"}}},
            r"refused: net_config\.model_kwargs\.aux_params\._target_='os\.system'",
        ),
        ({"arch": "NoSuchNet"}, r"net_config\.arch='NoSuchNet' is not a segmentation-models"),
        ({"encoder_name": "hf-hub:evil/net"}, r"encoder_name='hf-hub:evil/net' is not a library"),
    ):
        path = tmp_path / "seg.ckpt"
        segmenter_checkpoint(path)
        ckpt = torch.load(path, weights_only=True)
        ckpt["hyper_parameters"]["net_config"].update(extra)
        torch.save(ckpt, path)
        with pytest.raises(CheckpointError, match=why) as e:
            Segmenter.load(path, "cpu")
        assert_one_line(str(e.value))


@pytest.mark.parametrize("how", list(DAMAGE_MESSAGES))
@pytest.mark.parametrize("loader", list(LOADERS))
def test_damaged_files_are_refused_in_one_line(loader: str, how: str, tmp_path: Path) -> None:
    good = (
        segmenter_checkpoint(tmp_path / "good.ckpt")
        if loader == "Segmenter.load"
        else classifier_checkpoint(tmp_path / "good.ckpt")
    )
    path = damaged(tmp_path / f"{how}.ckpt", how, good)
    with pytest.raises(CamsegError, match=re.escape(DAMAGE_MESSAGES[how])) as e:
        LOADERS[loader](path)
    assert_one_line(str(e.value))
    assert str(path) in str(e.value)


def test_the_wrong_kind_of_checkpoint_names_the_right_place(tmp_path: Path) -> None:
    seg = segmenter_checkpoint(tmp_path / "seg.ckpt")
    cls = classifier_checkpoint(tmp_path / "cls.ckpt")
    with pytest.raises(
        CheckpointError,
        match=r"seg\.ckpt: a camseg segmenter checkpoint, not a classifier; give a stage-1 "
        r"classifier checkpoint such as runs/<run>/cls/checkpoints/best\.ckpt",
    ):
        load_classifier(seg)
    with pytest.raises(
        CheckpointError,
        match=r"ckpt=.*cls\.ckpt: a camseg classifier checkpoint, not a segmenter; give a stage-3 "
        r"segmenter checkpoint such as runs/<run>/seg/checkpoints/best\.ckpt",
    ):
        Segmenter.load(cls, "cpu")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match=r"plain\.pt: not a camseg classifier checkpoint"):
        load_classifier(tmp_path / "plain.pt")


def test_hyper_parameters_are_saved_as_plain_data(tmp_path: Path) -> None:
    """OmegaConf containers and numpy values in hyper-parameters would make Lightning's
    checkpoint unloadable with weights_only=True: the modules save them as plain Python."""
    from camseg.cls.module import ClassifierModule

    cfg = classifier_config(num_classes=2)
    net = CamClassifier(2, "resnet18", "torchvision", 1, 32)
    module = ClassifierModule(
        net=net,
        optimizer=torch.optim.SGD,  # type: ignore[arg-type]
        class_names=["a", "b"],
        pos_weight=[np.float64(2.0), np.float32(0.5)],  # type: ignore[list-item]
        net_config=OmegaConf.create(cfg),  # type: ignore[arg-type]
    )
    checkpoint: dict[str, Any] = {"hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "hp.ckpt")
    hp = load_checkpoint(tmp_path / "hp.ckpt")["hyper_parameters"]
    assert hp["net_config"] == cfg and hp["pos_weight"] == [2.0, 0.5]


# --- the stages, on a real tiny run ----------------------------------------------------------


def make_cfg(root: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "config", overrides=[*DATA, f"paths.root_dir={root}", "run_name=good", *overrides]
        )


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny cls -> pseudo -> seg run; tests copy what they change."""
    root = tmp_path_factory.mktemp("ckpt_run")
    run_pipeline(make_cfg(root))
    return root


def copy_stage(real_run: Path, dst_root: Path, *stages: str) -> Path:
    """``real_run``'s data and the named stages of its run, under ``dst_root``."""
    (dst_root / "runs" / "good").mkdir(parents=True)
    os.symlink(real_run / "data", dst_root / "data")
    for s in stages:
        shutil.copytree(real_run / "runs" / "good" / s, dst_root / "runs" / "good" / s)
    return dst_root


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CAMSEG_CONF_DIR"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def camseg(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "camseg.app", *DATA, f"paths.root_dir={root}", *args],
        cwd=root,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_refused(proc: subprocess.CompletedProcess[str], tool: str, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip()
    assert_one_line(err)
    assert err.startswith(f"{tool}: error: "), err
    for f in fragments:
        assert f in err, err


def test_camseg_ckpt_path_with_a_malicious_pickle(
    real_run: Path, tmp_path: Path, marker: Path
) -> None:
    evil = evil_pickle(tmp_path / "evil.ckpt", marker)
    proc = camseg(real_run, "stages=[cls]", "run_name=evil_resume", f"ckpt_path={evil}")
    assert_refused(proc, "camseg", f"ckpt_path={evil}: refused: its pickle names getattr")
    assert not (real_run / "runs" / "evil_resume" / "cls").exists()  # refused before anything


@pytest.mark.parametrize("kind", ["pickle", "target"])
def test_stage_pseudo_on_a_malicious_classifier_checkpoint(
    kind: str, real_run: Path, marker: Path
) -> None:
    """``runs/<name>/cls/checkpoints/best.ckpt`` is what ``stages=[pseudo]`` reads."""
    best = real_run / "runs" / f"evil_{kind}" / "cls" / "checkpoints" / "best.ckpt"
    best.parent.mkdir(parents=True)
    evil_pickle(best, marker) if kind == "pickle" else evil_target(best, marker)
    why = "refused: its pickle names getattr" if kind == "pickle" else "backbone._target_="
    with pytest.raises(CheckpointError, match=f"{re.escape(str(best))}: .*{why}") as e:
        run_pipeline(make_cfg(real_run, "stages=[pseudo]", f"run_name=evil_{kind}"))
    assert_one_line(str(e.value))


def test_stage_cls_pretrained_weights_with_a_malicious_pickle(
    real_run: Path, tmp_path: Path, marker: Path
) -> None:
    evil = evil_pickle(tmp_path / "evil.pth", marker)
    with pytest.raises(
        CheckpointError, match=f"model.net.pretrained='{re.escape(str(evil))}': refused: its pickle"
    ) as e:
        run_pipeline(
            make_cfg(real_run, "stages=[cls]", "run_name=evil_pt", f"model.net.pretrained={evil}")
        )
    assert_one_line(str(e.value))


def test_camseg_predict_with_a_malicious_pickle(tmp_path: Path, marker: Path) -> None:
    evil = evil_pickle(tmp_path / "evil.ckpt", marker)
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "in" / "a.png")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "camseg.predict",
            f"ckpt={evil}",
            f"input={tmp_path / 'in'}",
            f"output={tmp_path / 'out'}",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_refused(proc, "camseg-predict", f"ckpt={evil}: refused: its pickle names getattr")
    assert not (tmp_path / "out").exists()


def test_cam_overlay_with_a_malicious_checkpoint(
    tmp_path: Path, marker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = evil_pickle(tmp_path / "evil.ckpt", marker)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    script = str(REPO / "scripts" / "cam_overlay.py")
    args = ["--ckpt", str(evil), "--image", str(image), "--out", str(tmp_path / "o.png")]
    proc = subprocess.run(
        [sys.executable, script, *args], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert_refused(proc, "cam_overlay.py", f"--ckpt {evil}: refused: its pickle names getattr")
    # The same script on a stored _target_, in-process (a second subprocess costs ~20 s).
    evil_target(evil, marker)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", [script, *args])
        with pytest.raises(SystemExit) as code:
            runpy.run_path(script, run_name="__main__")
    err = capsys.readouterr().err.strip()
    assert code.value.code == 2 and err.startswith(f"cam_overlay.py: error: --ckpt {evil}: ")
    assert "refused: net_config.backbone._target_='shutil.copyfile'" in err
    assert_one_line(err)
    assert not (tmp_path / "o.png").exists()


def test_seg_ckpt_path_refuses_hostile_and_unfit_files(
    real_run: Path, tmp_path: Path, marker: Path
) -> None:
    root = copy_stage(real_run, tmp_path / "r", "cls", "pseudo")
    cases = {
        evil_pickle(tmp_path / "evil.ckpt", marker): "refused: its pickle names getattr",
        classifier_checkpoint(
            tmp_path / "cls.ckpt"
        ): "a camseg classifier checkpoint, not a segmenter",
        segmenter_checkpoint(
            tmp_path / "weights_only.ckpt"
        ): "cannot resume training from it (no loops, optimizer_states",
        segmenter_checkpoint(
            tmp_path / "other.ckpt", True, arch="Unet", encoder_name="resnet34"
        ): "checkpoint is of another model (encoder_name: resnet34 vs resnet18)",
        damaged(
            tmp_path / "trunc.ckpt", "truncated", real_run / "runs/good/seg/checkpoints/last.ckpt"
        ): "truncated or corrupt checkpoint",
    }
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    cases[tmp_path / "plain.pt"] = "not a camseg segmenter checkpoint"
    for path, why in cases.items():
        with pytest.raises(
            CheckpointError, match=f"ckpt_path={re.escape(str(path))}: .*{re.escape(why)}"
        ) as e:
            run_pipeline(make_cfg(root, "stages=[seg]", f"ckpt_path={path}"))
        assert_one_line(str(e.value))
    assert not (root / "runs" / "good" / "seg" / "checkpoints").exists()


def test_stage_pseudo_refuses_a_segmenter_or_truncated_classifier_checkpoint(
    real_run: Path, tmp_path: Path
) -> None:
    root = copy_stage(real_run, tmp_path / "r")
    best = root / "runs" / "good" / "cls" / "checkpoints" / "best.ckpt"
    best.parent.mkdir(parents=True)
    shutil.copy(real_run / "runs/good/seg/checkpoints/best.ckpt", best)
    with pytest.raises(
        CheckpointError,
        match=rf"{re.escape(str(best))}: a camseg segmenter checkpoint, not a classifier; give a "
        r"stage-1 classifier checkpoint such as runs/<run>/cls/checkpoints/best\.ckpt$",
    ):
        run_pipeline(make_cfg(root, "stages=[pseudo]"))
    damaged(best, "truncated", real_run / "runs/good/cls/checkpoints/best.ckpt")
    with pytest.raises(
        CheckpointError,
        match=rf"{re.escape(str(best))}: truncated or corrupt checkpoint \(.*\); "
        "re-run stage cls with force=true to rewrite it$",
    ) as e:
        run_pipeline(make_cfg(root, "stages=[pseudo]"))
    assert_one_line(str(e.value))


def test_a_truncated_last_checkpoint_on_auto_resume_says_how_to_go_on(
    real_run: Path, tmp_path: Path
) -> None:
    root = copy_stage(real_run, tmp_path / "r", "cls")
    cls = root / "runs" / "good" / "cls"
    (cls / "metrics.json").unlink()  # an interrupted stage: it resumes from last.ckpt by itself
    last = cls / "checkpoints" / "last.ckpt"
    damaged(last, "truncated", real_run / "runs/good/cls/checkpoints/last.ckpt")
    with pytest.raises(CheckpointError) as e:
        run_pipeline(make_cfg(root, "stages=[cls]"))
    assert str(e.value).startswith(f"{last}: truncated or corrupt checkpoint")
    assert str(e.value).endswith(
        "; stage cls cannot resume from it: delete it to start the stage over, or run with force=true"
    )
    run_pipeline(make_cfg(root, "stages=[cls]", "force=true"))  # the advice works
    load_classifier(last)


def test_own_checkpoints_load_resume_and_predict(real_run: Path, tmp_path: Path) -> None:
    run = real_run / "runs" / "good"
    for name in ("best", "last"):
        load_checkpoint(run / "cls" / "checkpoints" / f"{name}.ckpt")
        load_checkpoint(run / "seg" / "checkpoints" / f"{name}.ckpt")
    model, hp = load_classifier(run / "cls" / "checkpoints" / "best.ckpt")
    assert hp["class_names"] == ["hemorrhage"]
    # A camseg Lightning checkpoint is usable as local pretrained weights.
    warm = CamClassifier(
        1, "resnet18", "torchvision", 1, 16, str(run / "cls/checkpoints/best.ckpt")
    )
    torch.testing.assert_close(
        warm.encoder.state_dict()["body.0.weight"], model.encoder.state_dict()["body.0.weight"]
    )
    seg = Segmenter.load(run / "seg" / "checkpoints" / "best.ckpt", "cpu")
    assert seg.predict([np.zeros((20, 24, 1), np.uint8)])[0].shape == (20, 24)
    # Both stages resume their own last.ckpt (read with weights_only=True) for one more epoch.
    for stage, key in (("cls", "model"), ("seg", "seg")):
        root = copy_stage(real_run, tmp_path / stage, "cls", "pseudo", "seg")
        run_pipeline(make_cfg(root, f"stages=[{stage}]", "ckpt_path=last", f"{key}.max_epochs=2"))
        last = root / "runs" / "good" / stage / "checkpoints" / "last.ckpt"
        assert load_checkpoint(last)["epoch"] == 1
