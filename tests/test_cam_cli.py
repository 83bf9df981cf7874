"""camseg-cam: the classifier's own preprocessing, and method names from the CAM registry."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import camseg.cls.checkpoint as cls_checkpoint
from camseg.cam.factory import CAM_METHODS
from camseg.cam_cli import main, method_names
from camseg.data.preprocess import Preprocessing
from camseg.models.classifier import CamClassifier

NET = {"backbone": "resnet18", "source": "torchvision", "in_channels": 1, "num_classes": 2}


def classifier_checkpoint(path: Path, record: Preprocessing | None) -> Path:
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = CamClassifier(**NET)
    hp: dict[str, Any] = {"class_names": ["a", "b"], "multilabel": True, "net_config": NET}
    if record is not None:
        hp["preprocess"] = record.to_dict()
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "hyper_parameters": hp,
        },
        path,
    )
    return path


def record_inputs(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    load = cls_checkpoint.load_classifier

    def recording(*a: Any, **k: Any) -> Any:
        model, hp = load(*a, **k)
        model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
        return model, hp

    monkeypatch.setattr(cls_checkpoint, "load_classifier", recording)
    return seen


@pytest.fixture
def image(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70), dtype=np.uint8)).save(tmp_path / "x.png")
    return tmp_path / "x.png"


def expected_input(path: Path, size: int, mean: float, std: float) -> np.ndarray:
    raw = np.asarray(Image.open(path), dtype=np.uint8)
    small = cv2.resize(raw, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    return (small / 255 - mean) / std


def test_the_checkpoints_size_mean_and_std_are_used(
    tmp_path: Path, image: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    record = Preprocessing.from_config(40, 1, mean=[0.1], std=[0.4], class_names=["a", "b"])
    ckpt = classifier_checkpoint(tmp_path / "cls.ckpt", record)
    seen = record_inputs(monkeypatch)
    out = tmp_path / "cam.png"
    args = [
        "--ckpt",
        str(ckpt),
        "--image",
        str(image),
        "--out",
        str(out),
        "--scales",
        "1",
        "--no-flip",
    ]
    main([*args, "--method", "gradcampp"])
    assert seen[0].shape == (1, 1, 40, 40)  # not the old silent 128 px
    np.testing.assert_allclose(
        seen[0][0, 0].numpy(), expected_input(image, 40, 0.1, 0.4), atol=1e-5
    )
    printed = capsys.readouterr().out
    assert "a: p=" in printed and "b: p=" in printed
    pic = np.asarray(Image.open(out))
    assert pic.shape[1] == 3 * 70 + 4 * 2  # the image, then one CAM per class


def test_an_old_checkpoint_uses_its_run_config_and_says_so(
    tmp_path: Path, image: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = classifier_checkpoint(tmp_path / "cls" / "checkpoints" / "best.ckpt", None)
    (tmp_path / "cls" / "config.yaml").write_text(
        "data:\n  image_size: 48\n  in_channels: 1\n  mean: [0.2]\n  std: [0.3]\n"
    )
    seen = record_inputs(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="camseg"):
        main(
            [
                "--ckpt",
                str(ckpt),
                "--image",
                str(image),
                "--out",
                str(tmp_path / "c.png"),
                "--no-flip",
            ]
        )
    np.testing.assert_allclose(
        seen[0][0, 0].numpy(), expected_input(image, 48, 0.2, 0.3), atol=1e-5
    )
    (warning,) = [
        r.getMessage() for r in caplog.records if "no preprocessing record" in r.getMessage()
    ]
    assert "image_size=48" in warning and "mean=[0.2]" in warning and "run's config.yaml" in warning


def test_method_names_are_the_config_group_names(
    tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    groups = {p.stem for p in (Path(__file__).parents[1] / "conf" / "cam").glob("*.yaml")}
    names = set(method_names().values())
    assert names == groups - {"ensemble"}  # every single method, spelt as its conf/cam file
    assert set(method_names()) == set(CAM_METHODS)  # every registry name is accepted
    assert method_names()["gradcam++"] == "gradcampp"
    ckpt = classifier_checkpoint(tmp_path / "cls.ckpt", Preprocessing.from_config(32, 1))
    with pytest.raises(SystemExit) as e:
        main(["--ckpt", str(ckpt), "--image", str(image), "--method", "gradcam+"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "--method gradcam+: unknown; use one of ['cam', 'gradcam', 'gradcampp'" in err


def test_a_25d_classifier_refuses_a_2d_image(tmp_path: Path, image: Path) -> None:
    net = {**NET, "in_channels": 3}
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in CamClassifier(**net).state_dict().items()},
            "hyper_parameters": {
                "class_names": ["a", "b"],
                "net_config": net,
                "preprocess": Preprocessing.from_config(32, 3, context_slices=1).to_dict(),
            },
        },
        tmp_path / "c.ckpt",
    )
    from camseg.errors import CamsegError

    with pytest.raises(CamsegError, match=r"x\.png: the model is 2\.5D \(context_slices=1"):
        main(["--ckpt", str(tmp_path / "c.ckpt"), "--image", str(image)])
