"""Preflight: config, names and every file checked before the first training step; nothing
written or deleted where the user did not ask (issue 11, sections 3-4)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from camseg import preflight
from camseg.data import cli as data_cli
from camseg.data import folder
from camseg.errors import CamsegError, ConfigError, DatasetError
from camseg.pipeline import run_pipeline
from camseg.rundir import RunDir
from camseg.utils.io import remove_path

if TYPE_CHECKING:
    from conftest import DatasetKit

REPO = Path(__file__).resolve().parents[1]
CAMSEG = Path(sys.executable).with_name("camseg")


def make_cfg(root: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=["debug=fast", f"paths.root_dir={root}", "run_name=t", *overrides],
        )


def own_data(root: Path, data: Path, *overrides: str):
    return make_cfg(root, "data=default", f"data.root={data}", "data.num_workers=0", *overrides)


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 1 must never start: the preflight stops the run first."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("stage cls started although the preflight should have stopped the run")

    monkeypatch.setattr("camseg.cls.stage.run_cls", refuse)


# --- config types and ranges ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        (
            "pseudo.fg_threshold=abc",
            r"^pseudo\.fg_threshold=abc: not a number; it must be in \[0, 1\]$",
        ),
        (
            "pseudo.fg_threshold=1.5",
            r"^pseudo\.fg_threshold=1\.5: must be in \[0, 1\]$",
        ),
        (
            "pseudo.bg_threshold=0.6",
            r"pseudo\.bg_threshold=0\.6 > pseudo\.fg_threshold=0\.3: bg_threshold must be <= fg_threshold$",
        ),
        ("data.batch_size=0", r"^data\.batch_size=0: must be an integer >= 1$"),
        (
            "data.batch_size=abc",
            r"^data\.batch_size=abc: not an integer; it must be an integer >= 1$",
        ),
        ("seg.batch_size=0", r"^seg\.batch_size=0: must be an integer >= 1$"),
        ("seg.batch_size=abc", r"^seg\.batch_size=abc: not an integer"),
        ("model.max_epochs=0", r"^model\.max_epochs=0: must be an integer >= 1$"),
        ("data.image_size=-8", r"^data\.image_size=-8: must be an integer >= 1$"),
        ("seg.optimizer.lr=0", r"^seg\.optimizer\.lr=0: must be > 0$"),
        (
            "data.val_fraction=1.2",
            r"^data\.val_fraction=1\.2: must be in \[0, 1\]$",
        ),
        ("cam.scales=[1.0,0]", r"^cam\.scales\[1\]=0: must be > 0$"),
    ],
)
def test_bad_config_values_are_refused_before_anything_runs(
    tmp_path: Path, no_training: None, override: str, pattern: str
) -> None:
    cfg = make_cfg(tmp_path, override)
    with pytest.raises(ConfigError, match=pattern):
        run_pipeline(cfg)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def test_several_bad_values_are_named_in_one_line(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "data.batch_size=0", "seg.max_epochs=abc")
    with pytest.raises(ConfigError) as e:
        preflight.check_config(cfg)
    assert "data.batch_size=0" in str(e.value) and "seg.max_epochs=abc" in str(e.value)
    assert "\n" not in str(e.value)
    preflight.check_config(make_cfg(tmp_path))  # the shipped defaults pass


# --- run_name and deletions -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../victim", "a/b", "..", "-x", ".hidden", "a\\b"])
def test_unsafe_run_names_are_refused_and_nothing_is_deleted(
    tmp_path: Path, no_training: None, name: str
) -> None:
    victim = tmp_path / "victim"
    (victim / "pseudo").mkdir(parents=True)
    (victim / "pseudo" / "keep.txt").write_text("mine")
    (victim / "cls" / "checkpoints").mkdir(parents=True)
    (victim / "cls" / "checkpoints" / "best.ckpt").write_bytes(b"x")
    cfg = make_cfg(
        tmp_path / "work" / "here", f"run_name='{name}'", "force=true", "stages=[pseudo]"
    )
    with pytest.raises(
        ConfigError, match=r"^run_name=.*: must be a single folder name under paths\.runs_dir"
    ):
        run_pipeline(cfg)
    assert (victim / "pseudo" / "keep.txt").read_text() == "mine"


def test_output_subdir_must_stay_inside_the_run(tmp_path: Path) -> None:
    for sub in ("../x", "/abs", "a/../../b"):
        with pytest.raises(
            ConfigError, match=r"^output_subdir=.*: must be a relative path inside the run"
        ):
            preflight.check_config(make_cfg(tmp_path, f"output_subdir='{sub}'"))
    preflight.check_config(make_cfg(tmp_path, "output_subdir=ablations/no_crf"))


def test_remove_path_refuses_anything_outside_its_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f.txt").write_text("keep")
    run = tmp_path / "run"
    run.mkdir()
    (run / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(CamsegError, match=r"refusing to delete .*f\.txt: it resolves to .*outside"):
        remove_path(run / "linked" / "f.txt", run)  # reached through a link: refused
    with pytest.raises(CamsegError, match=r"refusing to delete"):
        remove_path(run / ".." / "outside", run)
    with pytest.raises(CamsegError, match=r"refusing to delete"):
        remove_path(run, run)
    remove_path(run / "linked", run)  # a link is removed itself, never its target
    assert not (run / "linked").is_symlink()
    assert (outside / "f.txt").read_text() == "keep"
    (run / "inside").mkdir()
    (run / "inside" / "a.txt").write_text("x")
    remove_path(run / "inside", run)
    assert not (run / "inside").exists()


# --- synthetic data only where camseg keeps it -------------------------------------------------


def test_a_mistyped_data_root_is_refused_and_nothing_is_written(
    tmp_path: Path, no_training: None
) -> None:
    (tmp_path / "mydata").mkdir()
    typo = tmp_path / "mydat" / "set"
    cfg = make_cfg(tmp_path / "work", f"data.root={typo}", "stages=[cls]")  # data=default forgotten
    with pytest.raises(DatasetError) as e:
        run_pipeline(cfg)
    msg = str(e.value)
    assert msg.startswith(f"data.root={typo}: no labels.csv there") and "paths.data_dir" in msg
    assert "data=default" in msg and "\n" not in msg
    assert not (tmp_path / "mydat").exists()


def test_synthetic_data_is_still_generated_into_the_data_directory(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path,
        "data.synthetic.patients=3",
        "data.synthetic.slices_per_patient=2",
        "data.synthetic.size=32",
    )
    run = RunDir(tmp_path / "runs" / "t")
    index = preflight.check_data(cfg, run)
    assert len(index) == 6
    assert Path(str(cfg.data.root)).resolve().is_relative_to((tmp_path / "data").resolve())


# --- every file, before training ---------------------------------------------------------------


def test_a_mask_value_beyond_the_classes_is_refused_at_preflight(
    tiny_dataset: Path, kit: DatasetKit, tmp_path: Path, no_training: None
) -> None:
    rows = kit.read_rows(tiny_dataset)
    mask = np.zeros((48, 48), np.uint8)
    mask[3, 3] = 2
    Image.fromarray(mask).save(tiny_dataset / rows[4]["mask"])
    with pytest.raises(DatasetError) as e:
        run_pipeline(own_data(tmp_path / "w", tiny_dataset))
    msg = str(e.value)
    assert rows[4]["mask"].split("/")[-1] in msg and "mask has value(s) [2]" in msg
    assert "allowed are 0 (background) to 1 (1 = lesion) and 255 (ignore)" in msg
    assert not (tmp_path / "w" / "runs" / "t" / "cls").exists()


def test_a_truncated_image_is_refused_before_training(
    tiny_dataset: Path, kit: DatasetKit, tmp_path: Path, no_training: None
) -> None:
    rows = kit.read_rows(tiny_dataset)
    path = tiny_dataset / rows[2]["image"]
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetError, match=r"P00_02\.png \(labels\.csv row 3\): cannot read image"):
        run_pipeline(own_data(tmp_path / "w", tiny_dataset))


def _link_outside(tiny_dataset: Path, kit: DatasetKit, tmp_path: Path, folder_link: bool) -> None:
    outside = tmp_path / "elsewhere"
    rows = kit.read_rows(tiny_dataset)
    if folder_link:
        os.replace(tiny_dataset / "images", outside)
        (tiny_dataset / "images").symlink_to(outside, target_is_directory=True)
    else:
        outside.mkdir()
        target = tiny_dataset / rows[0]["image"]
        os.replace(target, outside / target.name)
        target.symlink_to(outside / target.name)


@pytest.mark.parametrize("folder_link", [False, True], ids=["file", "images-folder"])
def test_symlinks_out_of_the_root_are_refused(
    tiny_dataset: Path,
    kit: DatasetKit,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_training: None,
    folder_link: bool,
) -> None:
    _link_outside(tiny_dataset, kit, tmp_path, folder_link)
    assert data_cli.main(["check", str(tiny_dataset)]) == 2
    err = capsys.readouterr().err
    assert "resolves to" in err and "outside the dataset root" in err
    with pytest.raises(DatasetError, match=r"outside the dataset root"):
        run_pipeline(own_data(tmp_path / "w", tiny_dataset))
    # A link that stays inside the root is fine.
    if not folder_link:
        rows = kit.read_rows(tiny_dataset)
        link = tiny_dataset / rows[0]["image"]
        link.unlink()
        os.replace(tmp_path / "elsewhere" / link.name, tiny_dataset / "real.png")
        link.symlink_to(tiny_dataset / "real.png")
        folder.validate_root(tiny_dataset)


def test_check_reports_every_problem_at_once(
    tiny_dataset: Path, kit: DatasetKit, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rows = kit.read_rows(tiny_dataset)
    rows[1]["lesion"] = "2"
    kit.write_rows(tiny_dataset, rows)
    (tiny_dataset / rows[3]["image"]).write_bytes(b"not a png")
    (tiny_dataset / rows[5]["mask"]).unlink()
    Image.fromarray(np.full((48, 48), 9, np.uint8)).save(tiny_dataset / rows[7]["mask"])
    assert data_cli.main(["check", str(tiny_dataset)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 5, lines
    assert "row 2" in lines[0] and "'lesion' has value 2" in lines[0]
    assert "row 6" in lines[1] and "mask file" in lines[1]
    assert "row 4" in lines[2] and "cannot read image" in lines[2]
    assert "row 8" in lines[3] and "mask has value(s) [9]" in lines[3]
    assert lines[4].endswith(": 4 problems")
    # The run says it in one line: the count, the first problems, where to see them all.
    with pytest.raises(DatasetError) as e:
        run_pipeline(own_data(tmp_path / "w", tiny_dataset))
    msg = str(e.value)
    assert "4 problems" in msg and f"camseg-data check {tiny_dataset}" in msg and "\n" not in msg


def test_the_problem_list_is_capped(tiny_dataset: Path, kit: DatasetKit) -> None:
    rows = kit.read_rows(tiny_dataset)
    for r in rows:
        r["lesion"] = "x"
    kit.write_rows(tiny_dataset, rows)
    with pytest.raises(folder.DatasetProblems) as e:
        folder.validate_root(tiny_dataset)
    assert e.value.total == len(rows) == 24 and len(e.value.problems) == folder.PROBLEM_CAP


def test_a_second_preflight_decodes_nothing(
    tiny_dataset: Path, kit: DatasetKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[str] = []
    read_image = folder.read_image

    def counting(path: Path):  # type: ignore[no-untyped-def]
        decoded.append(Path(path).name)
        return read_image(path)

    monkeypatch.setattr(folder, "read_image", counting)
    cfg = own_data(tmp_path / "w", tiny_dataset)
    run = RunDir(tmp_path / "w" / "runs" / "t")
    before = sorted(p.name for p in tiny_dataset.rglob("*"))
    preflight.check_data(cfg, run)
    assert len(decoded) == 24
    decoded.clear()
    preflight.check_data(cfg, run)
    assert decoded == []
    assert (run.root / preflight.CACHE_NAME).is_file()
    assert sorted(p.name for p in tiny_dataset.rglob("*")) == before  # nothing in the user's root
    # A changed file is decoded again, and only that one.
    rows = kit.read_rows(tiny_dataset)
    path = tiny_dataset / rows[0]["image"]
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(path)
    os.utime(path, ns=(1, 1))
    preflight.check_data(cfg, run)
    assert decoded == [path.name]


# --- camseg-predict output names ----------------------------------------------------------------


def test_predict_outputs_keep_relative_paths_and_refuse_collisions(tmp_path: Path) -> None:
    from camseg.predict import check_output_collisions, output_path

    src, out = tmp_path / "in", tmp_path / "out"
    (src / "a").mkdir(parents=True)
    apart = [src / "a" / "b.png", src / "a__b.png"]
    assert output_path(apart[0], src, out) == out / "masks" / "a" / "b.png"
    assert output_path(apart[1], src, out) == out / "masks" / "a__b.png"
    check_output_collisions(apart, src, out)
    with pytest.raises(
        CamsegError,
        match=r"1 input\(s\) would overwrite another's output, e\.g\. x\.jpg and x\.png both give",
    ):
        check_output_collisions([src / "x.jpg", src / "x.png"], src, out)
    with pytest.raises(CamsegError, match=r"v\.nii and v\.nii\.gz both give .*v_mask\.nii\.gz"):
        check_output_collisions([src / "v.nii", src / "v.nii.gz"], src, out)


# --- the command line: one line, exit status 2 --------------------------------------------------


@pytest.mark.skipif(not CAMSEG.exists(), reason="the camseg console script is not installed")
def test_cli_refusals_are_one_line_with_status_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CAMSEG_CONF_DIR"}
    env["HYDRA_FULL_ERROR"] = "0"
    typo = tmp_path / "typo"
    commands = {
        "threshold": ["pseudo.fg_threshold=abc"],
        "typo": [f"data.root={typo}", "stages=[cls]"],
        "victim": ["run_name=../../victim", "force=true"],
    }
    procs = {
        name: subprocess.Popen(
            [str(CAMSEG), *args, f"paths.root_dir={tmp_path}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in commands.items()
    }
    results = {name: (p.communicate(timeout=180), p.returncode) for name, p in procs.items()}
    for name, ((stdout, stderr), code) in results.items():
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, (name, stderr)
        assert lines[0].startswith("camseg: error: ") and "Traceback" not in stdout + stderr
    assert results["threshold"][0][1].strip() == (
        "camseg: error: pseudo.fg_threshold=abc: not a number; it must be in [0, 1]"
    )
    assert "no labels.csv there" in results["typo"][0][1]
    assert not typo.exists() and not (tmp_path / "data").exists()
    # Hydra's log folder is named after run_name too: refused before it is made.
    assert "run_name='../../victim': must be a single folder name" in results["victim"][0][1]
    assert not (tmp_path / "victim").exists()


# --- keys that moved --------------------------------------------------------------------------


def test_moved_seg_keys_are_refused_with_their_new_spelling(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        preflight.check_overrides(["seg.arch=FPN", "seed=3", "+seg.encoder_name=resnet34"])
    assert str(e.value) == (
        "seg.arch=FPN: seg.arch is now seg.net.arch (seg.net.arch=FPN); "
        "+seg.encoder_name=resnet34: seg.encoder_name is now seg.net.encoder_name "
        "(seg.net.encoder_name=resnet34)"
    )
    with pytest.raises(ConfigError, match=r"seg\.net\.model_kwargs\.decoder_channels=\[8\]"):
        preflight.check_overrides(["seg.model_kwargs.decoder_channels=[8]"])
    # The loss kept its place: its old spelling still works.
    preflight.check_overrides(["seg.loss.name=dice", "seg.net.arch=FPN", "seg=fpn"])
    # A config file of the user's that still says seg.arch: refused before stage 1.
    cfg = make_cfg(tmp_path, "+seg.encoder_weights=imagenet")
    with pytest.raises(ConfigError) as e:
        preflight.check_config(cfg)
    assert str(e.value) == (
        "seg.encoder_weights (in a config file) is now seg.net.encoder_weights: move it there"
    )


def test_seg_net_builds_only_what_a_checkpoint_can_rebuild(tmp_path: Path) -> None:
    from camseg.checkpoints import segmenter_kwargs
    from camseg.seg.stage import net_factory

    factory, record = net_factory(make_cfg(tmp_path, "seg=fpn", "seg.net.encoder_name=resnet34"))
    assert record == {
        "arch": "FPN",
        "encoder_name": "resnet34",
        "encoder_weights": None,
        "model_kwargs": None,
    }
    stored = {**record, "in_channels": 1, "num_classes": 2}
    rebuilt = segmenter_kwargs(stored, "ckpt")  # the checkpoint's whitelist accepts the record
    assert rebuilt["arch"] == "FPN" and rebuilt["encoder_name"] == "resnet34"
    net = factory(in_channels=1, num_classes=2)
    assert type(net).__name__ == "FPN" and net.segmentation_head[0].out_channels == 3
    with pytest.raises(ConfigError, match=r"^seg\.net\._target_=torch\.nn\.Identity: stage 3"):
        net_factory(make_cfg(tmp_path, "seg.net._target_=torch.nn.Identity"))
