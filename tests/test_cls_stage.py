"""Stage 1 through Hydra: ``camseg stages=[cls]`` composed in-process and run with a shrunk trainer."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from PIL import Image

import camseg.cls.stage as cls_stage
from camseg.cls.checkpoint import load_classifier
from camseg.errors import CamsegError, ConfigError, DatasetError
from camseg.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
BATCH = 8
# (trainer-visible numbers only: wall times are not in metrics.json)
REPRODUCIBLE_KEYS = ("classes", "epochs", "global_step", "val", "test", "patients", "samples")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny tensors gain nothing from threads, and on a loaded 2-core machine OpenMP's
    # spinning threads make them ~100x slower than one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_dataset(root: Path, multiclass: bool = False, patients: int = 6, slices: int = 4) -> Path:
    """A trivially learnable dataset root in the camseg folder format.

    Multi-label: ``square`` = a bright centre square, ``edges`` = bright left and right
    borders; the four combinations (none, one, the other, both) all occur, in every patient.
    Multi-class: exactly one of ``dark`` / ``bright`` (the whole image's brightness).
    """
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    classes = ["dark", "bright"] if multiclass else ["square", "edges"]
    rows = []
    for p in range(patients):
        for s in range(slices):
            img = rng.integers(30, 70, size=(SIZE, SIZE)).astype(np.uint8)
            a, b = (p + s) % 2, (p + s // 2) % 2
            if multiclass:
                if a:
                    img[:] = rng.integers(170, 210, size=(SIZE, SIZE))
                labels = [1 - a, a]
            else:
                if a:
                    img[SIZE // 4 : 3 * SIZE // 4, SIZE // 4 : 3 * SIZE // 4] = 220
                if b:
                    img[:, :3] = 250
                    img[:, -3:] = 250
                labels = [a, b]
            name = f"P{p}_{s}"
            Image.fromarray(img).save(root / "images" / f"{name}.png")
            rows.append([f"images/{name}.png", f"P{p}", s, *labels])
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "group", "slice", *classes])
        w.writerows(rows)
    return root


def make_cfg(root: Path, data: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "debug=fast",
                f"paths.root_dir={root}",
                f"data.root={data}",
                "data.synthetic=null",
                f"data.image_size={SIZE}",
                f"data.batch_size={BATCH}",
                "trainer.enable_progress_bar=false",
                "stages=[cls]",
                "run_name=r",
                *overrides,
            ],
        )


def cls_dir(root: Path) -> Path:
    return root / "runs" / "r" / "cls"


def metrics_of(root: Path) -> dict[str, Any]:
    return json.loads((cls_dir(root) / "metrics.json").read_text())


def epoch_train_losses(root: Path) -> list[float]:
    with open(cls_dir(root) / "logs" / "csv" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss_epoch")]
    return [float(r["train/loss_epoch"]) for r in sorted(rows, key=lambda r: int(r["epoch"]))]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cls_data")
    return {
        "multilabel": write_dataset(base / "multilabel"),
        "multiclass": write_dataset(base / "multiclass", multiclass=True),
    }


# The full default stack (early stopping, LR monitor, CSV + TensorBoard), few epochs.
FULL = ("callbacks=default", "logger=default", "model.max_epochs=5", "seed=7")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, datasets: dict[str, Path]) -> Path:
    """One multi-label run with the default callbacks and loggers; tests only read it."""
    root = tmp_path_factory.mktemp("cls_run")
    run_pipeline(make_cfg(root, datasets["multilabel"], *FULL))
    return root


def test_run_writes_checkpoints_config_metrics_and_logs(trained: Path) -> None:
    out = cls_dir(trained)
    for rel in ("checkpoints/best.ckpt", "checkpoints/last.ckpt", "config.yaml", "metrics.json"):
        assert (out / rel).is_file(), rel
    assert list((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(out.rglob("*.tmp"))
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.model.net.backbone == "resnet18" and saved.stages == ["cls"]
    m = metrics_of(trained)
    assert m["classes"] == ["square", "edges"] and m["monitor"] == "val/auroc"
    assert m["best_checkpoint"] == str(out / "checkpoints" / "best.ckpt")
    # 6 patients: 4 train / 1 val / 1 test, 4 slices each; 16 images in batches of 8.
    assert m["samples"] == {"train": 16, "val": 4, "test": 4}
    assert m["epochs"] == 5 and m["global_step"] == 5 * math.ceil(16 / BATCH)
    for split in ("val", "test"):
        for key in ("loss", "auroc", "ap", "f1", "acc"):
            assert f"{split}/{key}" in m[split]
            if key != "loss":
                assert {f"{split}/{key}_square", f"{split}/{key}_edges"} <= set(m[split])
    # The test numbers are those of the best checkpoint on the held-out patients.
    with open(out / "logs" / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    test_rows = [r for r in rows if r.get("test/auroc")]
    assert len(test_rows) == 1
    assert float(test_rows[0]["test/loss"]) == pytest.approx(m["test"]["test/loss"], rel=1e-6)
    assert any(r.get("lr-AdamW") for r in rows), "LearningRateMonitor logged nothing"
    model, hp = load_classifier(out / "checkpoints" / "best.ckpt")
    assert hp["class_names"] == ["square", "edges"] and model.num_classes == 2


def test_training_loss_falls(trained: Path) -> None:
    losses = epoch_train_losses(trained)
    assert len(losses) == 5
    assert losses[-1] < 0.7 * losses[0], losses


# camseg.data builds albumentations.Compose without a seed, and Compose draws from its own
# generator, which Lightning's seed_everything does not reach: until the DataModule seeds it
# (from torch's generator in the main process, from torch.initial_seed() in each worker),
# runs with augmentations differ. Strict: this fails loudly once that is fixed.
def test_same_seed_same_metrics_with_augmentations(
    tmp_path: Path, datasets: dict[str, Path], trained: Path
) -> None:
    run_pipeline(make_cfg(tmp_path, datasets["multilabel"], *FULL))
    a, b = metrics_of(trained), metrics_of(tmp_path)
    assert {k: a[k] for k in REPRODUCIBLE_KEYS} == {k: b[k] for k in REPRODUCIBLE_KEYS}
    assert epoch_train_losses(trained) == epoch_train_losses(tmp_path)


def test_same_seed_same_metrics(tmp_path: Path, datasets: dict[str, Path]) -> None:
    """Two CPU runs with one seed write the same numbers; another seed other numbers."""
    args = ("data.train_transforms=[]", "model.max_epochs=2", "seed=3")
    for name, extra in (("a", ()), ("b", ()), ("c", ("seed=4",))):
        run_pipeline(make_cfg(tmp_path / name, datasets["multilabel"], *args, *extra))
    a, b, c = (metrics_of(tmp_path / n) for n in "abc")
    assert {k: a[k] for k in REPRODUCIBLE_KEYS} == {k: b[k] for k in REPRODUCIBLE_KEYS}
    assert epoch_train_losses(tmp_path / "a") == epoch_train_losses(tmp_path / "b")
    assert a["val"]["val/loss"] != c["val"]["val/loss"]


def test_multiclass_trains_with_softmax_in_bf16_channels_last(
    tmp_path: Path, datasets: dict[str, Path]
) -> None:
    overrides = ("model.multilabel=false", "model.max_epochs=2")
    amp = ("trainer.precision=bf16-mixed", "model.channels_last=true")
    run_pipeline(make_cfg(tmp_path, datasets["multiclass"], *overrides, *amp))
    m = metrics_of(tmp_path)
    assert m["multilabel"] is False and m["classes"] == ["dark", "bright"]
    assert m["global_step"] == 2 * math.ceil(16 / BATCH)
    _, hp = load_classifier(cls_dir(tmp_path) / "checkpoints" / "last.ckpt")
    assert hp["multilabel"] is False and hp["channels_last"] is True
    assert OmegaConf.load(cls_dir(tmp_path) / "config.yaml").trainer.precision == "bf16-mixed"
    for key in ("auroc", "ap", "f1", "acc"):
        assert np.isfinite(m["test"][f"test/{key}"])


class _StartRecorder(L.Callback):
    def __init__(self) -> None:
        self.starts: list[tuple[int, int]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.starts.append((trainer.current_epoch, trainer.global_step))


def test_resume_continues_from_the_saved_step(
    tmp_path: Path, datasets: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = _StartRecorder()
    original = cls_stage.build_trainer

    def build_trainer(*args: Any, **kwargs: Any) -> L.Trainer:
        trainer = original(*args, **kwargs)
        trainer.callbacks.append(recorder)
        return trainer

    monkeypatch.setattr(cls_stage, "build_trainer", build_trainer)
    data = datasets["multilabel"]
    run_pipeline(make_cfg(tmp_path, data, "model.max_epochs=1"))
    steps_per_epoch = math.ceil(metrics_of(tmp_path)["samples"]["train"] / BATCH)
    last = torch.load(cls_dir(tmp_path) / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == steps_per_epoch
    run_pipeline(make_cfg(tmp_path, data, "model.max_epochs=2", "ckpt_path=last"))
    assert recorder.starts == [(0, 0), (1, steps_per_epoch)]
    m = metrics_of(tmp_path)
    assert m["epochs"] == 2 and m["global_step"] == 2 * steps_per_epoch
    last = torch.load(cls_dir(tmp_path) / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 2 * steps_per_epoch
    # The CSV log continues: one training-loss row per epoch, the first run's kept.
    with open(cls_dir(tmp_path) / "logs" / "csv" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss_epoch")]
    assert [(int(r["epoch"]), int(r["step"])) for r in rows] == [
        (0, steps_per_epoch - 1),
        (1, 2 * steps_per_epoch - 1),
    ]


# ---------------------------------------------------------------- bad input, one line each


def _one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("model=resnet34", "ckpt_path=last"), r"another model \(backbone: resnet18 vs resnet34\)"),
        (("model=resnet34",), r"another model \(backbone: resnet18 vs resnet34\)"),
        (
            ("data.classes=[square]", "ckpt_path=last"),
            r"trained for classes \['square', 'edges'\] but the dataset has \['square'\]",
        ),
    ],
)
def test_checkpoint_of_another_model_or_classes_is_refused(
    trained: Path, datasets: dict[str, Path], overrides: tuple[str, ...], message: str
) -> None:
    before = (cls_dir(trained) / "metrics.json").read_bytes()
    with pytest.raises(CamsegError, match=message) as e:
        run_pipeline(make_cfg(trained, datasets["multilabel"], *FULL, *overrides))
    _one_line(e)
    assert (cls_dir(trained) / "metrics.json").read_bytes() == before


def test_monitor_never_logged_is_refused_before_training(
    tmp_path: Path, datasets: dict[str, Path]
) -> None:
    with pytest.raises(
        ConfigError,
        match=r"model\.monitor='val/nope' is never logged; choose one of \[.*'val/auroc'",
    ) as e:
        run_pipeline(make_cfg(tmp_path, datasets["multilabel"], "model.monitor=val/nope"))
    _one_line(e)
    assert not (cls_dir(tmp_path) / "checkpoints").exists()
    with pytest.raises(ConfigError, match=r"model\.monitor='test/auroc' is never logged"):
        run_pipeline(make_cfg(tmp_path, datasets["multilabel"], "model.monitor=test/auroc"))


def test_multiclass_needs_exactly_one_positive_per_image(
    tmp_path: Path, datasets: dict[str, Path]
) -> None:
    with open(datasets["multilabel"] / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    counts = {int(r["square"]) + int(r["edges"]) for r in rows}
    assert {0, 2} <= counts  # the data has images with no and with two positives
    with pytest.raises(
        DatasetError,
        match=r"labels\.csv: image 'images/P\d_\d\.png' has [02] positive classes; model\.multilabel=false needs exactly one",
    ) as e:
        run_pipeline(make_cfg(tmp_path, datasets["multilabel"], "model.multilabel=false"))
    _one_line(e)
    assert not cls_dir(tmp_path).exists()


def test_resume_without_a_last_checkpoint_says_so(
    tmp_path: Path, datasets: dict[str, Path]
) -> None:
    with pytest.raises(CamsegError, match=r"ckpt_path=last: .*last\.ckpt not found"):
        run_pipeline(make_cfg(tmp_path, datasets["multilabel"], "ckpt_path=last"))


def test_pos_weight_of_the_wrong_length_is_refused(
    tmp_path: Path, datasets: dict[str, Path]
) -> None:
    with pytest.raises(ConfigError, match=r"model\.pos_weight has 3 values for the 2 classes"):
        run_pipeline(make_cfg(tmp_path, datasets["multilabel"], "model.pos_weight=[1,2,3]"))
