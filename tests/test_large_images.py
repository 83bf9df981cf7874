"""Images above data.max_image_pixels: a warning once, bounded float maps, masks at full size.

A moderate image with a lowered limit stands in for an 8000x8000 one (the memory figures
measured on the real sizes are in the commit message and the report).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import camseg.utils.large as large
from camseg.cam import PseudoMaskPolicy
from camseg.predict import run
from camseg.pseudo.writer import CamPredictModule, PseudoLabelWriter, SampleInfo
from segmenter_ckpt import write_checkpoint


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(large, "_warned", set())


def test_working_size_keeps_the_aspect_and_the_limit() -> None:
    assert large.working_size(100, 50, None) == (100, 50)
    assert large.working_size(100, 50, 5000) == (100, 50)
    h, w = large.working_size(8000, 4000, 4096 * 4096)
    assert h * w <= 4096 * 4096 and abs(h / w - 2) < 1e-3


class _CentreEngine:
    """CAMs (B,1,8,8): 1 in the centre 4x4, 0 elsewhere (whatever the input)."""

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cams = torch.zeros(images.shape[0], 1, 8, 8)
        cams[:, :, 2:6, 2:6] = 1.0
        return cams


def test_stage2_large_image_warns_once_and_masks_come_back_full_size(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    policy = PseudoMaskPolicy(fg_threshold=0.5, bg_threshold=0.1)
    module = CamPredictModule(torch.nn.Identity(), _CentreEngine(), policy, max_image_pixels=4000)
    batch = {
        "image": torch.zeros(3, 1, 8, 8),
        "labels": torch.ones(3, 1),
        "orig_size": torch.tensor([[300, 200], [40, 30], [200, 300]]),
        "id": ["big", "small", "big2"],
    }
    with caplog.at_level(logging.WARNING, logger="camseg"):
        out = module.predict_step(batch, 0)
    warnings = [r.getMessage() for r in caplog.records if "max_image_pixels" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once, though two images are large
    assert "image big is 200x300 (0.1 Mpx), above data.max_image_pixels=4000" in warnings[0]
    # Masks at each image's own size; CAMs of the large ones at a working size <= the limit.
    assert [tuple(m.shape) for m in out["masks"]] == [(300, 200), (40, 30), (200, 300)]
    assert tuple(out["cams"][1].shape) == (1, 40, 30)
    for i in (0, 2):
        c = out["cams"][i]
        assert c.shape[1] * c.shape[2] <= 4000 and c.dtype == torch.float16
    big = out["masks"][0].numpy()
    assert set(np.unique(big)) <= {0, 1, 255}
    assert big[150, 100] == 1 and big[5, 5] == 0  # the centre is lesion, the corner background

    # The writer takes the working-size CAMs with the full-size mask and ground truth.
    (tmp_path / "img.png").parent.mkdir(exist_ok=True)
    Image.fromarray(np.full((300, 200), 90, np.uint8)).save(tmp_path / "img.png")
    gt = np.zeros((300, 200), np.uint8)
    gt[75:225, 50:150] = 1
    Image.fromarray(gt).save(tmp_path / "gt.png")
    info = SampleInfo("big", "img.png", tmp_path / "img.png", tmp_path / "gt.png", "P0")
    writer = PseudoLabelWriter(
        tmp_path / "pseudo", {"big": info}, policy, 1, True, {"big"}, [0.3, 0.5]
    )
    writer.on_predict_start(None, None)  # type: ignore[arg-type]
    try:
        writer._write_one("big", out["cams"][0].numpy(), big, np.ones(1, np.uint8))
    finally:
        writer.on_predict_end(None, None)  # type: ignore[arg-type]
    written = np.asarray(Image.open(tmp_path / "pseudo" / "masks" / "big.png"))
    np.testing.assert_array_equal(written, big)
    assert (tmp_path / "pseudo" / "overlays" / "big.png").is_file()


def test_camseg_predict_large_image_warns_and_keeps_its_size(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_checkpoint(tmp_path / "seg.ckpt")
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (240, 180), dtype=np.uint8)).save(src / "big.png")
    Image.fromarray(rng.integers(0, 255, (30, 20), dtype=np.uint8)).save(src / "small.png")
    args = [f"ckpt={tmp_path / 'seg.ckpt'}", f"input={src}", "device=cpu"]
    with caplog.at_level(logging.WARNING, logger="camseg"):
        assert run([*args, f"output={tmp_path / 'o'}", "max_image_pixels=5000"]) == 0
    warnings = [r.getMessage() for r in caplog.records if "max_image_pixels" in r.getMessage()]
    assert len(warnings) == 1 and "big.png is 180x240" in warnings[0]
    assert np.asarray(Image.open(tmp_path / "o/masks/big.png")).shape == (240, 180)
    assert np.asarray(Image.open(tmp_path / "o/masks/small.png")).shape == (30, 20)
    # No limit: the same sizes, no warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="camseg"):
        assert run([*args, f"output={tmp_path / 'o2'}", "max_image_pixels=none"]) == 0
    assert not [r for r in caplog.records if "max_image_pixels" in r.getMessage()]
    assert np.asarray(Image.open(tmp_path / "o2/masks/big.png")).shape == (240, 180)


def test_stage3_labels_of_a_large_image_come_back_full_size_as_uint8() -> None:
    from camseg.seg.module import full_size_labels

    logits = torch.zeros(1, 2, 8, 8)
    logits[0, 1, 2:6, 2:6] = 5.0  # class 1 in the centre
    small = full_size_labels(logits, 40, 30, max_pixels=4000)
    assert small.shape == (40, 30) and small.dtype == torch.uint8
    exact = torch.nn.functional.interpolate(logits, size=(40, 30), mode="bilinear").argmax(1)[0]
    assert torch.equal(small.long(), exact)  # below the limit: as before
    big = full_size_labels(logits, 300, 200, max_pixels=4000)
    assert big.shape == (300, 200) and big.dtype == torch.uint8
    assert big[150, 100] == 1 and big[5, 5] == 0
