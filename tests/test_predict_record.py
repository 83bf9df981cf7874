"""camseg-predict applies the checkpoint's preprocessing record: CT windows, 2.5D context,
channels; DICOM series input; lesion volumes in mL."""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from camseg.predict import Segmenter, main, run
from segmenter_ckpt import write_checkpoint


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """The CT display window, written out here independently of camseg."""
    lo = center - width / 2
    return np.floor(np.clip((hu - lo) / width, 0, 1) * 255 + 0.5).astype(np.uint8)


def record_inputs(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Every tensor the loaded network is called with."""
    seen: list[torch.Tensor] = []
    load = Segmenter.load.__func__  # type: ignore[attr-defined]

    def recording(cls: type[Segmenter], *a: object, **k: object) -> Segmenter:
        seg = load(cls, *a, **k)
        seg.net.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
        return seg

    monkeypatch.setattr(Segmenter, "load", classmethod(recording))
    return seen


def call(monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["camseg-predict", *argv])
    with pytest.raises(SystemExit) as exc:
        main()
    return int(exc.value.code or 0)


def hu_volume(shape: tuple[int, int, int] = (32, 32, 3)) -> np.ndarray:
    """HU from -1400 to 400 across x, a different offset per slice (all of it matters in
    the lung window, most of it is black or white in the brain window)."""
    x = np.linspace(-1400, 400, shape[0], dtype=np.float32)
    return np.stack([x[:, None] + 37 * z + np.zeros(shape[1]) for z in range(shape[2])], axis=2)


def test_a_nifti_sent_to_a_lung_window_model_gets_the_lung_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = write_checkpoint(tmp_path / "seg.ckpt", windows=["lung"], mean=[0.3], std=[0.2])
    hu = hu_volume().astype(np.float32)
    zooms = (0.7, 0.9, 2.5)
    nib.save(nib.Nifti1Image(hu, np.diag([*zooms, 1.0])), tmp_path / "ct.nii.gz")
    seen = record_inputs(monkeypatch)
    args = [f"ckpt={ckpt}", f"input={tmp_path / 'ct.nii.gz'}", f"output={tmp_path / 'out'}"]
    assert run([*args, "device=cpu"]) == 0
    fed = torch.cat(seen).numpy()
    assert fed.shape == (3, 1, 32, 32)
    for z in range(3):
        # RAS+ volume: display rows = anterior first, columns = patient right first.
        shown = hu[:, :, z].T[::-1, ::-1]
        expected = (window(shown, -600, 1500) / 255.0 - 0.3) / 0.2
        np.testing.assert_allclose(fed[z, 0], expected, rtol=0, atol=1e-5)
        brain = (window(shown, 40, 80) / 255.0 - 0.3) / 0.2
        assert np.abs(fed[z, 0] - brain).max() > 1  # what the brain window would have fed
    # volumes.csv: the written mask's voxels times the voxel volume.
    mask = np.asarray(nib.load(tmp_path / "out/ct_mask.nii.gz").dataobj)
    with open(tmp_path / "out/volumes.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    voxels = int((mask == 1).sum())
    assert row["class"] == "lesion" and row["mask"] == "ct_mask.nii.gz"
    assert int(row["voxels"]) == voxels
    assert float(row["volume_ml"]) == pytest.approx(voxels * 0.7 * 0.9 * 2.5 / 1000, abs=1e-6)


def test_a_25d_model_refuses_2d_images_and_stacks_volume_neighbours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = write_checkpoint(tmp_path / "seg.ckpt", in_channels=3, context_slices=1)
    (tmp_path / "png").mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "png" / f"{name}.png")
    out = tmp_path / "out"
    code = call(monkeypatch, f"ckpt={ckpt}", f"input={tmp_path / 'png'}", f"output={out}")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "the model is 2.5D (context_slices=1: each input stacks 3 neighbouring slices)" in err
    assert "a.png and 1 more" in err and "NIfTI volume or a DICOM series" in err
    assert not out.exists()
    # A volume: slice z sees z-1, z, z+1 (clamped), each through the recorded brain window.
    hu = hu_volume((32, 32, 4)) / 20 + 40  # inside the brain window
    nib.save(nib.Nifti1Image(hu.astype(np.float32), np.eye(4)), tmp_path / "v.nii")
    seen = record_inputs(monkeypatch)
    assert run([f"ckpt={ckpt}", f"input={tmp_path / 'v.nii'}", f"output={out}", "device=cpu"]) == 0
    fed = torch.cat(seen).numpy()
    planes = [(window(hu[:, :, z].T[::-1, ::-1], 40, 80) / 255 - 0.5) / 0.25 for z in range(4)]
    for z in range(4):
        for c, d in enumerate((-1, 0, 1)):
            np.testing.assert_allclose(fed[z, c], planes[min(max(z + d, 0), 3)], atol=1e-5)


def test_windows_argument_only_where_the_checkpoint_records_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    nib.save(nib.Nifti1Image(hu_volume((32, 32, 2)), np.eye(4)), tmp_path / "v.nii.gz")
    lung = write_checkpoint(tmp_path / "lung.ckpt", windows=["lung"])
    base = [f"input={tmp_path / 'v.nii.gz'}", f"output={tmp_path / 'o'}", "device=cpu"]
    assert call(monkeypatch, f"ckpt={lung}", *base, "windows=brain") == 2
    err = capsys.readouterr().err
    assert "windows=brain: ckpt=" in err and "trained on the CT windows lung (-600/1500)" in err
    assert call(monkeypatch, f"ckpt={lung}", *base, "windows=-600/1500") == 0  # the same window
    capsys.readouterr()
    plain = write_checkpoint(tmp_path / "plain.ckpt", windows=[])
    assert call(monkeypatch, f"ckpt={plain}", *base) == 2
    assert "the model records no CT windows" in capsys.readouterr().err
    seen = record_inputs(monkeypatch)
    assert call(monkeypatch, f"ckpt={plain}", *base, "windows=lung") == 0
    shown = hu_volume((32, 32, 2))[:, :, 0].T[::-1, ::-1]
    expected = (window(shown, -600, 1500) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(torch.cat(seen).numpy()[0, 0], expected, atol=1e-5)


def test_a_checkpoint_from_before_the_record_warns_what_it_assumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = write_checkpoint(tmp_path / "old.ckpt", record=False)
    with caplog.at_level(logging.WARNING, logger="camseg"):
        Segmenter.load(old, "cpu")
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"ckpt={old}: no preprocessing record")
    assert "image_size=32" in message and "windows=brain 40/80" in message


def test_wrong_channel_count_and_both_argument_spellings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    two = write_checkpoint(tmp_path / "two.ckpt", in_channels=2)
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(src / "rgb.png")
    code = call(monkeypatch, "--ckpt", str(two), "--input", str(src), f"--output={tmp_path / 'o'}")
    err = capsys.readouterr().err
    assert code == 1
    assert f"  {src / 'rgb.png'}: a 3-channel image, but the model takes 2 channel(s)" in err
    one = write_checkpoint(tmp_path / "one.ckpt")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8)).save(src / "rgb.png")
    assert call(monkeypatch, f"ckpt={one}", f"input={src}", f"output={tmp_path / 'a'}") == 0
    flags = ["--ckpt", str(one), "--input", str(src), "--output", str(tmp_path / "b")]
    assert call(monkeypatch, *flags, "--batch-size", "2", "--device", "cpu") == 0
    a = np.asarray(Image.open(tmp_path / "a/masks/rgb.png"))
    np.testing.assert_array_equal(a, np.asarray(Image.open(tmp_path / "b/masks/rgb.png")))


def write_series(folder: Path, stored: np.ndarray, z: list[float], order: list[int]) -> None:
    """A CT series of (Z,H,W) stored values (HU = 2 * stored - 1024), files in ``order``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    series = generate_uid()
    for n, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.Modality = series, "CT"
        ds.Rows, ds.Columns = stored.shape[1:]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.ImagePositionPatient = [-20.0, 30.0, z[k]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.7, 0.8]  # between rows, between columns
        ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
        ds.InstanceNumber = k + 1
        ds.PixelData = stored[k].astype(np.uint16).tobytes()
        ds.save_as(folder / f"IM{n:03d}", enforce_file_format=True)  # no suffix: found by preamble


def test_a_dicom_series_is_windowed_sorted_and_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = write_checkpoint(tmp_path / "seg.ckpt", windows=["lung"])

    def threshold(self: Segmenter, images: list[np.ndarray]) -> list[np.ndarray]:
        return [(im[..., 0] > 127).astype(np.uint8) for im in images]  # lung window > -600 HU

    monkeypatch.setattr(Segmenter, "predict", threshold)
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 1100, size=(4, 12, 10)).astype(np.uint16)
    z = [10.0, 12.5, 15.0, 17.5]
    write_series(tmp_path / "in" / "patient1", stored, z, order=[2, 0, 3, 1])
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "in" / "photo.png")
    out = tmp_path / "out"
    assert run([f"ckpt={ckpt}", f"input={tmp_path / 'in'}", f"output={out}", "device=cpu"]) == 0
    hu = stored.astype(np.float64) * 2 - 1024
    expected = window(hu, -600, 1500) > 127  # (Z,rows,cols), slices in z order
    img = nib.load(out / "patient1_mask.nii.gz")
    mask = np.asarray(img.dataobj)
    assert mask.shape == (10, 12, 4)  # (column, row, slice)
    np.testing.assert_array_equal(mask, expected.transpose(2, 1, 0).astype(np.uint8))
    # LPS -> RAS: x and y flip sign; spacing column 0.8, row 0.7, slice 2.5 mm.
    np.testing.assert_allclose(
        img.affine,
        [[-0.8, 0, 0, 20.0], [0, -0.7, 0, -30.0], [0, 0, 2.5, 10.0], [0, 0, 0, 1]],
        atol=1e-6,
    )
    with open(out / "volumes.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    voxels = int(expected.sum())
    assert row["input"] == str(tmp_path / "in" / "patient1") and int(row["voxels"]) == voxels
    assert float(row["volume_ml"]) == pytest.approx(voxels * 0.7 * 0.8 * 2.5 / 1000, abs=1e-6)
    assert (out / "masks" / "photo.png").is_file()  # images beside the series still work
