"""``register`` wires the converters into an argparse CLI; the output folder rules they share."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camseg.data.folder import validate_root
from camseg.data.prepare import register
from camseg.data.prepare.common import check_out_dir, cli_runner, staged_output
from camseg.errors import DatasetError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="camseg-data")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def _class_tree(root: Path) -> Path:
    for cls, value in (("lesion", 200), ("normal", 30)):
        for i in range(2):
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8), value + i, dtype=np.uint8)).save(
                root / cls / f"{cls}{i}.png"
            )
    return root


def test_every_subcommand_is_registered_with_a_func(tmp_path: Path) -> None:
    parser = _parser()
    for argv in (
        ["ct-ich", "src", "--out", "o", "--windows=-600/1500", "--subtypes", "--strict"],
        [
            "lidc",
            "src",
            "--out",
            "o",
            "--consensus",
            "0.75",
            "--min-readers",
            "2",
            "--crop",
            "lungs",
        ],
        ["folder", "src", "--out", "o", "--mask-suffix", "_mask", "--negative-class", "normal"],
        ["lgg-mri", "src", "--out", "o", "--patients", "3"],
    ):
        args = parser.parse_args(argv)
        assert callable(args.func) and args.src == Path("src") and args.out == Path("o")
    args = parser.parse_args(["ct-ich", "s", "--out", "o", "--windows=-600/1500"])
    assert args.windows == "-600/1500"
    assert parser.parse_args(["lidc", "s", "--out", "o", "--consensus", "0.75"]).consensus == 0.75
    assert parser.parse_args(
        ["folder", "s", "--out", "o", "--negative-class", "a", "--negative-class", "b"]
    ).negative_class == ["a", "b"]
    with pytest.raises(SystemExit):
        parser.parse_args(["lidc", "src"])  # --out is required


def test_cli_runs_a_conversion(tmp_path: Path) -> None:
    src = _class_tree(tmp_path / "src")
    args = _parser().parse_args(
        [
            "folder",
            str(src),
            "--out",
            str(tmp_path / "out"),
            "--negative-class",
            "normal",
            "--no-progress",
        ]
    )
    assert args.func(args) == 0
    index = validate_root(tmp_path / "out")
    assert index.classes == ["lesion"] and len(index) == 4


def test_out_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _class_tree(tmp_path / "src")
    parser = _parser()
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is fine
    args = parser.parse_args(["folder", str(src), "--out", str(out)])
    assert args.func(args) == 0
    assert "folder: wrote 4 samples to" in capsys.readouterr().out
    (out / "stale.txt").write_text("old")
    with pytest.raises(
        DatasetError, match="folder is not empty; choose an empty --out or pass --overwrite"
    ):
        args.func(args)
    args = parser.parse_args(
        ["folder", str(src), "--out", str(out), "--overwrite", "--no-progress"]
    )
    assert args.func(args) == 0
    assert not (out / "stale.txt").exists()
    with open(out / "labels.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4
    # no staging folder or old copy left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    with pytest.raises(DatasetError, match="overlaps the source folder"):
        check_out_dir(src / "converted", src, overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="exists and is not a folder"):
        check_out_dir(tmp_path / "file", src, overwrite=True)


def test_interrupted_staging_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), staged_output(out) as stage:
        (stage / "half.png").write_bytes(b"x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_every_option_reaches_the_converter_under_its_keyword(tmp_path: Path) -> None:
    """The lidc subcommand's --crop is the converter's crop_mode; the output options follow."""
    calls: list[tuple[tuple, dict]] = []

    def fake(*args: object, **kwargs: object) -> Path:
        calls.append((args, kwargs))
        return tmp_path

    parser = _parser()
    args = parser.parse_args(
        ["lidc", "s", "--out", "o", "--crop", "lungs", "--crop-size", "96", "--strict"]
    )
    run = cli_runner(fake, "crop_size", "min_readers", crop_mode="crop")
    assert run(args) == 0
    assert calls == [
        (
            (Path("s"), Path("o")),
            {
                "crop_size": 96,
                "min_readers": 1,
                "crop_mode": "lungs",
                "strict": True,
                "overwrite": False,
                "progress": True,
            },
        )
    ]
    args = parser.parse_args(["lgg-mri", "s", "--out", "o", "--no-progress", "--overwrite"])
    cli_runner(fake, "patients")(args)
    assert calls[-1][1] == {"patients": None, "overwrite": True, "progress": False}  # no --strict
