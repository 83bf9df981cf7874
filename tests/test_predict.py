"""camseg-predict on 2D images and NIfTI volumes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from camseg.errors import CamsegError
from camseg.predict import Segmenter, parse_args, run
from segmenter_ckpt import write_checkpoint


def threshold_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace the network by a deterministic rule of the input: class 1 where the middle channel > 127."""

    def predict(self: Segmenter, images: list[np.ndarray]) -> list[np.ndarray]:
        mid = images[0].shape[2] // 2
        return [(im[..., mid] > 127).astype(np.uint8) for im in images]

    monkeypatch.setattr(Segmenter, "predict", predict)


def test_images_give_masks_and_overlays(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "seg.ckpt")
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(src / "a.png")
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(src / "sub" / "b.jpg")
    assert run([f"ckpt={ckpt}", f"input={src}", f"output={tmp_path / 'out'}", "device=cpu"]) == 0
    a = np.asarray(Image.open(tmp_path / "out/masks/a.png"))
    b = np.asarray(Image.open(tmp_path / "out/masks/sub/b.png"))
    assert a.shape == (40, 50) and b.shape == (30, 30)
    assert set(np.unique(a)) <= {0, 1}
    assert (tmp_path / "out/overlays/a.png").is_file()


def test_nifti_volume_round_trips_orientation_and_affine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = write_checkpoint(tmp_path / "seg.ckpt")
    threshold_model(monkeypatch)
    hu = np.full((20, 24, 6), -1000.0, np.float32)  # air
    hu[3:7, 15:20, 2] = 70.0  # a bright blob (brain window 40/80 -> 70 HU is white)
    hu[10, 2, 4] = 70.0
    # A non-canonical affine (x flipped, y flipped): the output must come back in the input's voxel order.
    affine = np.diag([-0.8, -0.8, 5.0, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "vol.nii.gz")
    run(
        [
            f"ckpt={ckpt}",
            f"input={tmp_path / 'vol.nii.gz'}",
            f"output={tmp_path / 'out'}",
            "device=cpu",
        ]
    )
    out = nib.load(tmp_path / "out/vol_mask.nii.gz")
    mask = np.asarray(out.dataobj)
    assert mask.shape == hu.shape and mask.dtype == np.uint8
    np.testing.assert_allclose(out.affine, affine)
    # brain window: 70 HU -> 255 (> 127): the mask is exactly the bright voxels, in the input's own order.
    np.testing.assert_array_equal(mask, (hu > 0).astype(np.uint8))


def test_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(CamsegError, match="missing input="):
        parse_args(["ckpt=x", "output=y"])
    with pytest.raises(CamsegError, match="unknown argument"):
        parse_args(["ckpt=x", "input=y", "output=z", "colour=red"])
    with pytest.raises(CamsegError, match="not found"):
        Segmenter.load(tmp_path / "nope.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "cls.ckpt")
    with pytest.raises(CamsegError, match="not a camseg segmenter checkpoint"):
        Segmenter.load(tmp_path / "cls.ckpt")
    ckpt = write_checkpoint(tmp_path / "seg.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CamsegError, match="no images"):
        run([f"ckpt={ckpt}", f"input={tmp_path / 'empty'}", f"output={tmp_path / 'o'}"])
