"""TensorBoard pictures: CAM overlays in stage 1, predictions in stage 3, hparams at the end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from camseg.tb_images import TensorBoardImages, display_image

pytest.importorskip("tensorboard")


class _Net(torch.nn.Module):
    """GAP + linear on a 2-channel feature map that is the image and its negative."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = torch.nn.Linear(2, 1)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.tensor([[1.0, 0.0]]))
            self.classifier.bias.zero_()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1], -x[:, :1]], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def _events(log_dir: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    acc.Reload()
    return {tag: acc.Images(tag) for tag in acc.Tags()["images"]}


def test_display_image_stretches_the_middle_channel() -> None:
    x = torch.stack([torch.zeros(4, 4), torch.arange(16.0).reshape(4, 4), torch.ones(4, 4)])
    img = display_image(x)
    assert img.dtype == np.uint8 and img.min() == 0 and img.max() == 255
    assert img[0, 1] == round(255 / 15)


def test_classifier_cams_and_hparams_reach_tensorboard(tmp_path: Path) -> None:
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"lr": 0.1})
            self.net = _Net()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, i):
            return self(batch["image"]).mean()

        def validation_step(self, batch, i):
            self.log("val/score", float(i))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    img = torch.zeros(6, 1, 8, 8)
    img[:, :, 2:4, 2:4] = 1.0  # the CAM (= the image) peaks here
    data = torch.utils.data.DataLoader([{"image": im} for im in img], batch_size=6)
    logger = TensorBoardLogger(tmp_path, name="tb", version="", default_hp_metric=False)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ck", monitor="val/score", mode="max"
    )
    trainer = L.Trainer(
        max_epochs=2,
        logger=logger,
        callbacks=[TensorBoardImages(max_images=3), ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(Module(), train_dataloaders=data, val_dataloaders=data)
    images = _events(Path(logger.log_dir))
    assert sorted(images) == ["val_cam/0", "val_cam/1", "val_cam/2"]
    assert len(images["val_cam/0"]) == 2  # one per validation epoch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logger.log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    plugins = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugins  # the HParams tab has a session
    assert "hp/val/score" in acc.Tags()["scalars"]


def test_without_tensorboard_logger_nothing_is_drawn(tmp_path: Path) -> None:
    cb = TensorBoardImages(max_images=2)

    class Trainer:
        loggers: tuple = ()
        sanity_checking = False

    cb.on_validation_batch_end(Trainer(), None, None, {"image": torch.zeros(2, 1, 4, 4)}, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_images=-1"):
        TensorBoardImages(max_images=-1)
