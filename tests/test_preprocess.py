"""The preprocessing record: validated plain data, the DataModule's own batches, and a round
trip through both stages' checkpoints."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from camseg.checkpoints import CLASSIFIER, SEGMENTER, read_checkpoint
from camseg.cls.module import ClassifierModule
from camseg.data.datamodule import CamSegDataModule
from camseg.data.preprocess import (
    PreprocessError,
    Preprocessing,
    from_hparams,
    to_channels,
)
from camseg.errors import ConfigError
from camseg.models.classifier import CamClassifier
from camseg.models.segmenter import build_segmentation_net
from camseg.seg.module import SegmenterModule
from camseg.utils.io import read_image


def lung_record(**kw: object) -> Preprocessing:
    args: dict = dict(
        image_size=24,
        in_channels=3,
        context_slices=1,
        mean=[0.3],
        std=[0.2],
        windows=["lung"],
        class_names=["nodule"],
    )
    args.update(kw)
    return Preprocessing.from_config(**args)


def test_record_round_trips_as_plain_data() -> None:
    record = lung_record()
    d = record.to_dict()
    assert d == {
        "version": 1,
        "image_size": 24,
        "in_channels": 3,
        "context_slices": 1,
        "mean": [0.3],
        "std": [0.2],
        "windows": [{"name": "lung", "center": -600.0, "width": 1500.0}],
        "class_names": ["nodule"],
    }
    assert Preprocessing.from_dict(d) == record
    assert record.channels == 1 and record.views == 3
    # Saved by torch.save and read with weights_only=True: plain containers only.
    assert torch.load(_saved(d), weights_only=True) == d


def _saved(obj: object) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "r.pt"
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"_target_": "os.system"}, r"ckpt: unknown field\(s\) \['_target_'\]"),
        ({"image_size": "32"}, r"ckpt\.image_size='32' is not an integer >= 1"),
        ({"in_channels": 2}, r"ckpt\.in_channels=2 is not a multiple of the 3 slices"),
        ({"mean": [0.1, 0.2]}, r"ckpt\.mean/std need 1 or 1 values, got 2/1"),
        ({"std": [0]}, r"ckpt\.std=\[0\.0\] has a zero"),
        ({"windows": [{"name": "x", "center": 1}]}, r"ckpt\.windows: .* is not a window"),
        ({"windows": ["lung", "brain"]}, r"ckpt\.windows: got 2 window\(s\)"),
        ({"windows": ["brain", "subdural", "bone"]}, r"3 window\(s\) but 1 channel\(s\) per slice"),
        ({"class_names": "nodule"}, r"ckpt\.class_names='nodule' is not a list of names"),
        ({"version": 7}, r"ckpt\.version=7: this camseg reads version 1"),
    ],
)
def test_a_bad_stored_record_is_refused_in_one_line(change: dict, message: str) -> None:
    d = {**lung_record().to_dict(), **change}
    with pytest.raises(PreprocessError, match=message) as e:
        Preprocessing.from_dict(d, "ckpt")
    assert "\n" not in str(e.value)


def test_config_errors_name_the_data_keys() -> None:
    with pytest.raises(ConfigError, match=r"data\.windows: '-600' is not a window"):
        lung_record(windows=["-600"])
    with pytest.raises(ConfigError, match=r"data\.windows: 1 window\(s\) but 3 channel\(s\) per"):
        lung_record(in_channels=9)


def test_the_datamodule_batches_are_the_records_input(tmp_path: Path, kit) -> None:  # type: ignore[no-untyped-def]
    """One preprocessing: an evaluation batch equals ``record.to_input`` of the image file."""
    root = kit.write(tmp_path / "d", kit.tiny_records(size=40), ["lesion"])
    dm = CamSegDataModule(
        root=str(root),
        image_size=24,
        in_channels=3,
        mean=[0.1, 0.2, 0.3],
        std=[0.5, 0.25, 0.2],
        windows="brain,subdural,bone",
        train_transforms=None,
        num_workers=0,
    )
    record = dm.preprocess
    assert record.class_names == ("lesion",) and len(record.windows) == 3
    ds = dm.dataset("val", train=False)
    for i in (0, 1):
        raw = read_image(ds.items[i].image)
        expected = record.to_input([to_channels(raw, 3)])[0]
        np.testing.assert_allclose(ds[i]["image"].numpy(), expected, rtol=0, atol=1e-5)
    # The same by hand: bilinear resize, then (x/255 - mean) / std per channel.
    import cv2

    raw = read_image(ds.items[0].image)
    small = cv2.resize(raw, (24, 24), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255
    np.testing.assert_allclose(ds[0]["image"][2].numpy(), (small - 0.3) / 0.2, rtol=0, atol=1e-5)


def _fit_and_save(module: L.LightningModule, dm: CamSegDataModule, path: Path) -> None:
    trainer = L.Trainer(
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(path)


def test_both_checkpoints_carry_the_record(tmp_path: Path, tiny_dataset: Path) -> None:
    dm = CamSegDataModule(
        root=str(tiny_dataset),
        image_size=32,
        in_channels=1,
        mean=[0.3],
        std=[0.2],
        windows=["lung"],
        train_transforms=None,
        batch_size=8,
        num_workers=0,
    )
    sgd = partial(torch.optim.SGD, lr=0.01)
    cls_cfg = {"backbone": "resnet18", "source": "torchvision", "in_channels": 1}
    cls = ClassifierModule(
        CamClassifier(1, **cls_cfg), sgd, dm.classes, net_config={**cls_cfg, "num_classes": 1}
    )
    _fit_and_save(cls, dm, tmp_path / "cls.ckpt")
    net_cfg = {
        "arch": "FPN",
        "encoder_name": "resnet18",
        "encoder_weights": None,
        "in_channels": 1,
        "num_classes": 1,
    }
    seg = SegmenterModule(
        build_segmentation_net(**net_cfg),
        dm.classes,
        {},
        sgd,
        net_config=net_cfg,
        data_config={"image_size": 32, "in_channels": 1, "mean": [0.3], "std": [0.2]},
    )
    _fit_and_save(seg, dm, tmp_path / "seg.ckpt")
    warnings: list[str] = []
    for name, kind in (("cls.ckpt", CLASSIFIER), ("seg.ckpt", SEGMENTER)):
        hp = read_checkpoint(tmp_path / name, kind)["hyper_parameters"]
        assert hp["preprocess"]["windows"] == [{"name": "lung", "center": -600.0, "width": 1500.0}]
        assert from_hparams(hp, name, warn=warnings.append) == dm.preprocess
    assert warnings == []  # a recorded checkpoint needs no fallback


def test_a_checkpoint_without_record_falls_back_loudly() -> None:
    hp = {
        "net_config": {"in_channels": 3},
        "data_config": {"image_size": 64, "in_channels": 3, "mean": [0.2], "std": [0.3]},
        "class_names": ["hemorrhage"],
    }
    said: list[str] = []
    record = from_hparams(hp, "ckpt=old.ckpt", warn=said.append)
    assert record.image_size == 64 and record.class_names == ("hemorrhage",)
    assert [w.name for w in record.windows] == ["brain", "subdural", "bone"]
    assert len(said) == 1
    assert said[0].startswith("ckpt=old.ckpt: no preprocessing record")
    for value in ("image_size=64", "mean=[0.2]", "std=[0.3]", "brain 40/80", "bone 600/2800"):
        assert value in said[0]
    # A classifier without a run config: camseg's old defaults, named.
    said.clear()
    old = from_hparams(
        {"net_config": {"in_channels": 1}, "class_names": ["a"]}, "x", warn=said.append
    )
    assert (old.image_size, old.mean, old.std) == (128, (0.5,), (0.25,))
    assert "image_size=128" in said[0] and "camseg's old defaults" in said[0]
