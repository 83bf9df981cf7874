"""camseg-predict: bad arguments are one-line errors (exit 2) and a damaged image skips only itself."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import camseg.predict as predict
from camseg.predict import main
from segmenter_ckpt import write_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny stage-3 checkpoint (untrained FPN/resnet18 at 32 px, one class)."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "seg.ckpt")


def call(monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["camseg-predict", *argv])
    with pytest.raises(SystemExit) as exc:
        main()
    return int(exc.value.code or 0)


@pytest.fixture
def no_heavy_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Argument errors must come before the checkpoint is read."""

    def fail(*a: object, **k: object) -> None:
        raise AssertionError("Segmenter.load was called before the arguments were checked")

    monkeypatch.setattr(predict.Segmenter, "load", classmethod(fail))


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("batch_size=0", r"batch_size=0: must be a whole number >= 1"),
        ("batch_size=-1", r"batch_size=-1: must be a whole number >= 1"),
        ("batch_size=abc", r"batch_size=abc: must be a whole number >= 1"),
        ("device=bogus", r"device=bogus: not a device; use auto, cpu, cuda or cuda:N"),
        ("device=cuda:x", r"device=cuda:x: not a device"),
    ],
)
def test_bad_batch_size_or_device_is_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_heavy_loading: None,
    arg: str,
    message: str,
) -> None:
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "in" / "a.png")
    code = call(
        monkeypatch, "ckpt=x.ckpt", f"input={tmp_path / 'in'}", f"output={tmp_path / 'o'}", arg
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("camseg-predict: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_heavy_loading: None,
    device: str,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    code = call(
        monkeypatch,
        "ckpt=x.ckpt",
        f"input={tmp_path}",
        f"output={tmp_path / 'o'}",
        f"device={device}",
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"camseg-predict: error: device={device}: CUDA is not available on this machine" in err


def test_cuda_index_beyond_the_devices_is_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_heavy_loading: None,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code = call(
        monkeypatch, "ckpt=x.ckpt", f"input={tmp_path}", f"output={tmp_path / 'o'}", "device=cuda:1"
    )
    assert code == 2
    assert "device=cuda:1: this machine has 1 CUDA device(s)" in capsys.readouterr().err


def test_output_an_existing_file_is_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_heavy_loading: None,
) -> None:
    target = tmp_path / "result.png"
    target.write_bytes(b"keep me")
    code = call(monkeypatch, "ckpt=x.ckpt", f"input={tmp_path}", f"output={target}")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"camseg-predict: error: output={target}: is an existing file" in err
    assert target.read_bytes() == b"keep me"


def test_a_corrupt_image_skips_only_itself(
    tmp_path: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    names = [f"img{i:02d}" for i in range(9)]
    for n in names:
        Image.fromarray(rng.integers(0, 255, (24, 20), dtype=np.uint8)).save(src / f"{n}.png")
    good = (src / "img00.png").read_bytes()
    (src / "img03.png").write_bytes(good[: len(good) // 2])  # truncated
    (src / "img07.png").write_bytes(b"not an image at all")
    code = call(
        monkeypatch,
        f"ckpt={ckpt}",
        f"input={src}",
        f"output={tmp_path / 'out'}",
        "device=cpu",
        "batch_size=4",  # the bad files sit inside batches, with valid images after them
    )
    captured = capsys.readouterr()
    assert code == 1
    written = sorted(p.stem for p in (tmp_path / "out" / "masks").glob("*.png"))
    assert written == [n for n in names if n not in ("img03", "img07")]
    for n in written:
        assert np.asarray(Image.open(tmp_path / "out" / "masks" / f"{n}.png")).shape == (24, 20)
    assert "7 image(s), 0 volume(s)" in captured.out
    lines = captured.err.strip().splitlines()
    assert "camseg-predict: 2 of 9 input(s) skipped:" in lines
    bad = [line for line in lines if line.startswith("  ")]
    assert len(bad) == 2
    assert bad[0].startswith(f"  {src / 'img03.png'}: cannot read image (")
    assert bad[1].startswith(f"  {src / 'img07.png'}: cannot read image (")
