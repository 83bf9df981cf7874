"""CamClassifier (encoders from torchvision / timm / smp) and the stage-1 LightningModule."""

from __future__ import annotations

import functools
import socket
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from camseg.cam.cam import CAM
from camseg.cls.module import ClassifierModule, metric_name
from camseg.errors import ConfigError
from camseg.models.classifier import CamClassifier, build_encoder


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny tensors gain nothing from threads, and on a loaded 2-core machine OpenMP's
    # spinning threads make them ~100x slower than one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# (backbone, source, output_stride, channels of the last feature map): architecture facts.
ENCODERS = [
    ("resnet18", "torchvision", 32, 512),
    ("resnet18", "torchvision", 16, 512),
    ("resnet18", "torchvision", 8, 512),
    ("resnet34", "torchvision", 16, 512),
    ("resnet50", "torchvision", 8, 2048),
    ("efficientnet_b0", "torchvision", 32, 1280),
    ("densenet121", "torchvision", 32, 1024),
    ("convnext_tiny", "torchvision", 32, 768),
    ("resnet18", "timm", 16, 512),
    ("efficientnet_b0", "timm", 16, 320),
    ("convnext_tiny", "timm", 16, 768),
    ("densenet121", "timm", 32, 1024),
    ("resnet34", "smp", 8, 512),
    ("efficientnet-b0", "smp", 16, 320),
    ("densenet121", "smp", 32, 1024),
    ("tu-convnext_tiny", "smp", 32, 768),
]


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize(("backbone", "source", "stride", "channels"), ENCODERS)
def test_every_encoder_builds_offline_with_the_right_shapes(
    backbone: str, source: str, stride: int, channels: int, in_channels: int
) -> None:
    torch.manual_seed(0)
    model = CamClassifier(3, backbone, source, in_channels, stride, pretrained=False).eval()
    x = torch.randn(2, in_channels, 64, 64)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
    assert feats.shape == (2, channels, 64 // stride, 64 // stride)
    assert model.encoder.out_channels == channels
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    # GAP + one linear layer and nothing else between the features and the logits.
    assert isinstance(model.classifier, nn.Linear)
    assert (model.classifier.in_features, model.classifier.out_features) == (channels, 3)
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"encoder", "classifier"}


@pytest.mark.parametrize(
    ("backbone", "source", "stride"),
    [
        ("resnet18", "torchvision", 16),
        ("efficientnet_b0", "timm", 32),
        ("densenet121", "smp", 32),
    ],
)
def test_logits_are_the_linear_head_on_pooled_features(
    backbone: str, source: str, stride: int
) -> None:
    torch.manual_seed(1)
    model = CamClassifier(4, backbone, source, 3, stride, dropout=0.3).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        via_features = model.classifier(model.features(x).mean((2, 3)))
        f = model.features(x)
        # CAM_k = sum_c w_kc F_c by hand; its spatial mean plus the bias is logit k.
        cams = (model.classifier.weight[None, :, :, None, None] * f[:, None]).sum(2)
    torch.testing.assert_close(via_features, logits)
    torch.testing.assert_close(cams.mean((2, 3)) + model.classifier.bias, logits)
    raw, _ = CAM(model, relu=False).cams_and_logits(x)
    torch.testing.assert_close(raw, cams, rtol=1e-4, atol=1e-5)


def test_grey_input_through_the_adapted_first_conv_equals_its_rgb_copy(tmp_path: Path) -> None:
    """A 1-channel model loading RGB weights answers a grey image like the RGB model its copy."""
    torch.manual_seed(2)
    rgb = CamClassifier(2, "resnet18", "torchvision", 3, 32).eval()
    path = tmp_path / "rgb.pt"
    torch.save(rgb.state_dict(), path)
    grey = CamClassifier(2, "resnet18", "torchvision", 1, 32, pretrained=str(path)).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            grey.features(x), rgb.features(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("wrap", ["encoder", "classifier", "lightning", "torchvision_file"])
def test_pretrained_from_a_local_checkpoint_loads_its_weights(tmp_path: Path, wrap: str) -> None:
    torch.manual_seed(3)
    source = CamClassifier(5, "resnet18", "torchvision", 3, 16)
    if wrap == "encoder":
        state = source.encoder.state_dict()
    elif wrap == "classifier":
        state = source.state_dict()
    elif wrap == "lightning":
        state = {"state_dict": {f"net.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}
    else:  # torchvision's own file layout (conv1, bn1, layer1..4, fc), as downloaded elsewhere
        import torchvision

        tv = torchvision.models.resnet18()
        parts = {0: "conv1", 1: "bn1", 4: "layer1", 5: "layer2", 6: "layer3", 7: "layer4"}
        for i, name in parts.items():
            getattr(tv, name).load_state_dict(source.encoder.body[i].state_dict())
        state = tv.state_dict()
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    torch.manual_seed(99)  # a different random init, so equality means loaded
    loaded = CamClassifier(2, "resnet18", "torchvision", 3, 16, pretrained=str(path))
    want = source.encoder.state_dict()
    got = loaded.encoder.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)


def test_pretrained_local_file_errors_name_the_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.net\.pretrained=.*missing\.pt': file not found"):
        CamClassifier(2, pretrained=str(tmp_path / "missing.pt"))
    other = tmp_path / "other.pt"
    torch.save({"w": torch.zeros(3)}, other)
    with pytest.raises(ConfigError, match=r"model\.net\.pretrained=.*no tensor in it fits"):
        CamClassifier(2, pretrained=str(other))


def _refuse(*args: object, **kwargs: object) -> None:
    raise urllib.error.URLError("[Errno -2] Name or service not known")


def test_torchvision_download_offline_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.models._api as tv_api

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", _refuse)
    with pytest.raises(
        ConfigError, match=r"model\.net\.pretrained=True: cannot download.*pretrained=false"
    ) as e:
        build_encoder("resnet18", "torchvision", pretrained=True)
    assert "\n" not in str(e.value)
    with pytest.raises(
        ConfigError, match=r"model\.net\.pretrained='IMAGENET1K_V1'.*pretrained=false"
    ):
        build_encoder("resnet18", "torchvision", pretrained="IMAGENET1K_V1")


@pytest.mark.parametrize(("backbone", "source"), [("resnet18", "timm"), ("resnet18", "smp")])
def test_hub_download_offline_fails_fast_with_a_config_error(
    monkeypatch: pytest.MonkeyPatch, backbone: str, source: str
) -> None:
    # No proxy and no HF offline mode: the probe decides, and the network is refused at once.
    for var in (
        "HF_HUB_OFFLINE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(var, raising=False)

    def no_network(*args: object, **kwargs: object) -> socket.socket:
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(
        ConfigError,
        match=rf"model\.net\.pretrained=True: cannot download {source}.*unreachable.*pretrained=false",
    ):
        build_encoder(backbone, source, pretrained=True)


def test_bad_names_and_strides_are_config_errors() -> None:
    cases = [
        (dict(backbone="resnet18", source="keras"), r"model\.net\.source='keras'"),
        (dict(backbone="resnet18", output_stride=4), r"model\.net\.output_stride=4"),
        (dict(backbone="nope", source="torchvision"), r"model\.net\.backbone='nope'"),
        (dict(backbone="nope", source="timm"), r"model\.net\.backbone='nope'"),
        (dict(backbone="nope", source="smp"), r"model\.net\.backbone='nope'"),
        (
            dict(backbone="densenet121", output_stride=16),
            r"output_stride=16: torchvision 'densenet121' cannot be dilated",
        ),
        (
            dict(backbone="densenet121", source="timm", output_stride=16),
            r"output_stride=16: timm 'densenet121' cannot be dilated",
        ),
        (
            dict(backbone="densenet121", source="smp", output_stride=8),
            r"output_stride=8: smp 'densenet121' cannot be dilated",
        ),
        (
            dict(backbone="resnet18", pretrained="NOT_A_SET"),
            r"pretrained='NOT_A_SET'.*IMAGENET1K_V1",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            build_encoder(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the LightningModule


class _Batches(Dataset):
    """In-memory samples with camseg's batch keys; class k is 'bright quadrant k'."""

    def __init__(
        self, n: int, classes: int, multilabel: bool, size: int = 32, channels: int = 1
    ) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, channels, size, size, generator=g) * 0.1
        if multilabel:
            self.labels = (torch.rand(n, classes, generator=g) > 0.5).float()
        else:
            self.labels = F.one_hot(torch.arange(n) % classes, classes).float()
        h = size // 2
        for k in range(classes):
            rows, cols = divmod(k, 2)
            sel = self.labels[:, k] > 0
            self.images[sel, :, rows * h : (rows + 1) * h, cols * h : (cols + 1) * h] += 2.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "labels": self.labels[i]}


def _module(classes: int, multilabel: bool, **kw: object) -> ClassifierModule:
    torch.manual_seed(0)
    net = CamClassifier(classes, "resnet18", "torchvision", 1, 16)
    names = [f"c{k}" for k in range(classes)]
    return ClassifierModule(
        net,
        functools.partial(torch.optim.AdamW, lr=1e-3),
        names,
        multilabel=multilabel,
        **kw,  # type: ignore[arg-type]
    )


def _trainer(**kw: object) -> L.Trainer:
    base: dict = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    base.update(kw)
    return L.Trainer(**base)


def test_losses_are_bce_with_pos_weight_and_softmax_ce() -> None:
    ds = _Batches(6, 3, multilabel=True)
    batch = {"image": ds.images, "labels": ds.labels}
    m = _module(3, True, pos_weight=[2.0, 0.5, 1.0]).eval()
    with torch.no_grad():
        logits = m(batch["image"])
        expected = F.binary_cross_entropy_with_logits(
            logits, ds.labels, pos_weight=torch.tensor([2.0, 0.5, 1.0])
        )
        torch.testing.assert_close(m.loss_fn(logits, m._targets(ds.labels)), expected)
    mc = _Batches(6, 3, multilabel=False)
    m = _module(3, False).eval()
    with torch.no_grad():
        logits = m(mc.images)
        expected = F.cross_entropy(logits, mc.labels.argmax(1))
        torch.testing.assert_close(m.loss_fn(logits, m._targets(mc.labels)), expected)


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney U / (P*N): the probability a positive outranks a negative (ties count 1/2)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def test_epoch_metrics_match_an_independent_auroc_and_mark_undefined_classes_nan() -> None:
    m = _module(3, True)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(40, 3, generator=g)
    labels = (torch.rand(40, 3, generator=g) > 0.5).float()
    labels[:, 2] = 1.0  # class c2: no negative image, so its AUROC is undefined
    probs = torch.sigmoid(logits)
    for chunk in range(0, 40, 16):  # several batches, as in an epoch
        m.val_metrics.update(probs[chunk : chunk + 16], labels[chunk : chunk + 16].long())
        m.val_counts.update(labels[chunk : chunk + 16])
    out = m.epoch_metrics("val")
    expected = [_auroc(probs[:, k].numpy(), labels[:, k].numpy()) for k in range(2)]
    for k in range(2):
        assert out[metric_name("val", "auroc", f"c{k}")].item() == pytest.approx(
            expected[k], abs=1e-5
        )
    assert torch.isnan(out["val/auroc_c2"])
    assert out["val/auroc"].item() == pytest.approx(np.mean(expected), abs=1e-5)
    acc = ((probs > 0.5).float() == labels).float().mean(0)
    for k in range(3):
        assert out[f"val/acc_c{k}"].item() == pytest.approx(acc[k].item(), abs=1e-6)
    assert set(out) == {n for n in m.logged_metric_names(["val"]) if n != "val/loss"}


def _fit(module: ClassifierModule, ds: Dataset, **trainer_kw: object) -> L.Trainer:
    trainer = _trainer(**trainer_kw)
    loader = DataLoader(ds, batch_size=4, shuffle=False)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    return trainer


@pytest.mark.parametrize("multilabel", [True, False])
def test_module_trains_and_logs_every_name_it_declares(multilabel: bool) -> None:
    module = _module(3, multilabel)
    trainer = _fit(module, _Batches(8, 3, multilabel), limit_train_batches=2)
    logged = set(trainer.callback_metrics)
    declared = set(module.logged_metric_names(["train", "val"]))
    assert declared <= logged, declared - logged
    assert trainer.global_step == 2


def test_bf16_mixed_and_channels_last_run_a_training_step() -> None:
    module = _module(2, True, channels_last=True)
    before = [p.detach().clone() for p in module.net.parameters()]
    trainer = _fit(
        module,
        _Batches(8, 2, True),
        limit_train_batches=2,
        limit_val_batches=1,
        precision="bf16-mixed",
    )
    assert trainer.global_step == 2
    conv = module.net.encoder.body[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    params = list(module.net.parameters())
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(a, b) for a, b in zip(before, params))
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


def test_scheduler_partial_is_stepped_per_epoch() -> None:
    torch.manual_seed(0)
    net = CamClassifier(2, "resnet18", "torchvision", 1, 32)
    module = ClassifierModule(
        net,
        functools.partial(torch.optim.SGD, lr=0.1),
        ["a", "b"],
        scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    trainer = _fit(
        module, _Batches(4, 2, True), max_epochs=2, limit_train_batches=1, limit_val_batches=1
    )
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)


def test_class_count_mismatch_between_net_and_names_is_refused() -> None:
    net = CamClassifier(3, "resnet18", "torchvision", 1, 32)
    with pytest.raises(ValueError, match="3 outputs but 2 class names"):
        ClassifierModule(net, functools.partial(torch.optim.AdamW), ["a", "b"])
