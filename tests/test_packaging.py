"""camseg installed like a library: the wheel's contents, dependency ranges, extras, fast help.

The full check (a fresh venv, ``camseg debug=fast`` and ``camseg-predict`` from the installed
wheel) is ``scripts/check_wheel.sh``, which CI runs after the tests.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from camseg.optional import EXTRAS, MissingPackageError, import_optional

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
OPTIONAL = PYPROJECT["project"]["optional-dependencies"]
HEAVY = ("torch", "lightning", "cv2", "segmentation_models_pytorch", "matplotlib", "timm")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0]


def _setuptools_version() -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return (0,)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """camseg's wheel, built from a copy of the source tree (no build/ left in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    tree = tmp / "tree"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "conf"):
        shutil.copytree(REPO / name, tree / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, tree / name)
    # Without build isolation (no download) when this environment can build it.
    isolation = ["--no-build-isolation"] if _setuptools_version() >= (77,) else []
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp), "."],
        cwd=tree,
        check=True,
        capture_output=True,
    )
    print(f"wheel built in {time.perf_counter() - t0:.1f} s")
    (path,) = tmp.glob("camseg-*.whl")
    yield path


def test_wheel_ships_every_conf_yaml_as_camseg_conf(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        "camseg/conf/" + p.relative_to(REPO / "conf").as_posix()
        for p in (REPO / "conf").rglob("*.yaml")
    }
    assert len(expected) > 40
    assert expected - names == set()
    assert "camseg/conf/__init__.py" in names  # Hydra's pkg:// needs an importable package
    assert not any(n.startswith(("conf/", "tests/")) for n in names)


def test_packages_list_matches_the_tree() -> None:
    """pyproject lists packages by hand (conf/ is mapped in); a new folder must be added."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    src = {
        ".".join(p.parent.relative_to(REPO / "src").parts)
        for p in (REPO / "src" / "camseg").rglob("__init__.py")
    }
    conf = {"camseg.conf"} | {
        "camseg.conf." + d.name
        for d in (REPO / "conf").iterdir()
        if d.is_dir() and any(d.glob("*.yaml"))
    }
    assert listed == src | conf
    # package-data takes each package's own *.yaml: a nested group folder needs its entry too
    nested = [p for d in (REPO / "conf").iterdir() if d.is_dir() for p in d.iterdir() if p.is_dir()]
    assert [p for p in nested if p.name != "__pycache__"] == []


def test_installed_wheel_composes_its_config_from_the_package(wheel: Path, tmp_path: Path) -> None:
    """Outside the checkout, camseg finds pkg://camseg.conf and runs go to the working dir."""
    site = tmp_path / "install" / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    code = textwrap.dedent(
        """
        import camseg
        from hydra import compose
        from camseg.app import _has_config, _initialize, conf_dir

        print(camseg.__file__)
        print(conf_dir(), _has_config(conf_dir()))
        with _initialize(conf_dir()):
            cfg = compose("config", overrides=["experiment=synthetic"])
        print(cfg.pseudo.crf.iterations, cfg.paths.runs_dir)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "CAMSEG_CONF_DIR"}
    env["PYTHONPATH"] = str(site)
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out[0].startswith(str(site))
    assert out[1] == "pkg://camseg.conf True"
    assert out[2] == "10 ./runs"  # relative: the working directory, not site-packages


def test_camseg_conf_dir_env_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from camseg.app import _has_config, conf_dir

    monkeypatch.delenv("CAMSEG_CONF_DIR", raising=False)
    assert Path(conf_dir()) == REPO / "conf"  # the source checkout (editable install)
    monkeypatch.setenv("CAMSEG_CONF_DIR", str(tmp_path))
    assert conf_dir() == str(tmp_path.resolve())
    assert not _has_config(conf_dir())


def test_torch_is_a_range_and_the_pins_live_in_constraints() -> None:
    deps = {_name(d): d for d in PYPROJECT["project"]["dependencies"]}
    pins = dict(
        line.split("==")
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    for name in ("torch", "torchvision"):
        spec = deps[name]
        assert "==" not in spec, spec
        assert f">={pins[name]}" in spec and "<" in spec, (spec, pins[name])
    assert "-c constraints.txt" in (REPO / "Makefile").read_text()


def test_every_extra_named_in_a_message_exists() -> None:
    named: set[str] = set()
    for path in [*(REPO / "src").rglob("*.py"), *(REPO / "conf").rglob("*.yaml")]:
        for group in re.findall(r"camseg\[([\w,-]+)\]", path.read_text()):
            named.update(group.split(","))
    named.discard("extra")  # camseg.optional's own template, 'camseg[{extra}]'
    named |= {extra for _, extra in EXTRAS.values() if extra}
    assert {"dicom", "nifti", "tensorboard", "lidc", "sweep"} <= named
    assert named - set(OPTIONAL) == set()
    base = {_name(d) for d in PYPROJECT["project"]["dependencies"]}
    for extra, reqs in OPTIONAL.items():  # what an extra brings is not in the base as well
        assert {_name(r) for r in reqs} & base == set(), extra
    # dev pulls every extra, so the tests run with all optional parts
    assert "camseg[all]" in OPTIONAL["dev"]


@pytest.mark.parametrize(
    ("module", "extra"),
    [("pydicom", "dicom"), ("nibabel", "nifti"), ("tensorboard", "tensorboard")],
)
def test_missing_optional_package_is_one_line_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingPackageError) as info:
        import_optional(f"{module}.sub" if module == "pydicom" else module, "doing it")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.endswith(f"pip install 'camseg[{extra}]'"), msg


def test_readers_of_optional_formats_say_which_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from camseg.data.prepare.ctich import _load_volume, convert_ct_ich
    from camseg.data.prepare.dicom import read_dicom_series

    monkeypatch.setitem(sys.modules, "pydicom", None)
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(MissingPackageError, match=r"camseg\[dicom\]"):
        read_dicom_series(tmp_path)
    with pytest.raises(MissingPackageError, match=r"camseg\[nifti\]"):
        _load_volume(tmp_path / "x.nii.gz")
    (tmp_path / "release" / "ct_scans").mkdir(parents=True)
    with pytest.raises(MissingPackageError, match=r"ct-ich .* pip install 'camseg\[nifti\]'$"):
        convert_ct_ich(tmp_path / "release", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_default_logger_without_tensorboard_falls_back_to_csv_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from lightning.pytorch.loggers import Logger

    import camseg.loggers

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setattr(camseg.loggers, "_warned", False)
    with caplog.at_level("INFO", logger="camseg.loggers"):
        first = camseg.loggers.tensorboard_or_nothing(save_dir=str(tmp_path), name="tensorboard")
        camseg.loggers.tensorboard_or_nothing(save_dir=str(tmp_path), name="tensorboard")
    assert isinstance(first, Logger) and first.name == "tensorboard"
    first.log_metrics({"x": 1.0}, step=0)
    assert [r.getMessage() for r in caplog.records] == [
        "logger.tensorboard needs the optional package tensorboard: "
        "pip install 'camseg[tensorboard]'; logging to CSV only"
    ]
    assert not list(tmp_path.iterdir())


def test_camseg_predict_help_imports_no_heavy_package() -> None:
    """--help and argument errors answer before torch/Lightning load (they took 13-25 s)."""
    code = f"import sys, camseg.predict; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""
    script = Path(sys.executable).with_name("camseg-predict")
    if script.exists():
        t0 = time.perf_counter()
        proc = subprocess.run([str(script), "--help"], capture_output=True, text=True)
        print(f"camseg-predict --help: {time.perf_counter() - t0:.2f} s")
        assert proc.returncode == 0 and "camseg-predict ckpt=" in proc.stdout
