"""``data.in_channels`` is derived from ``data.slice_channels`` and ``data.context_slices``."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from camseg import preflight
from camseg.data.datamodule import CamSegDataModule
from camseg.errors import ConfigError
from camseg.resolvers import derive_in_channels

REPO = Path(__file__).resolve().parents[1]


def make_cfg(root: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.root_dir={root}", "run_name=t", *overrides])


def in_channels(cfg: DictConfig) -> int:
    return int(OmegaConf.select(cfg, "data.in_channels"))


@pytest.mark.parametrize(
    ("slice_channels", "context", "expected"),
    [(None, 0, 1), (1, 0, 1), (3, 0, 3), (None, 2, 5), (3, 1, 9), (1, 3, 7)],
)
def test_derived_count(slice_channels: int | None, context: int, expected: int) -> None:
    assert derive_in_channels(slice_channels, context) == expected


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ((), 1),  # the synthetic grey CT
        (("data=ct_ich",), 3),  # three CT windows per slice
        (("data=ct_ich", "data.context_slices=1"), 9),
        (("data=ct_ich", "data.context_slices=2"), 15),
        (("data=lgg_mri",), 3),
        (("data=lidc", "data.context_slices=1"), 3),
        (("experiment=hemorrhage",), 9),  # 3 windows x (2*1+1) slices, no longer by hand
        (("experiment=hemorrhage", "debug=fast"), 3),  # on the grey synthetic data: 1 x 3
        (("data=synthetic", "data.context_slices=1"), 3),
        # An explicit value that agrees, or one with no slice_channels to agree with, stays.
        (("data=ct_ich", "data.context_slices=1", "data.in_channels=9"), 9),
        (("data=default", "data.root=x", "data.in_channels=3"), 3),
    ],
)
def test_config_derives_in_channels(
    tmp_path: Path, overrides: tuple[str, ...], expected: int
) -> None:
    cfg = make_cfg(tmp_path, *overrides)
    assert in_channels(cfg) == expected
    preflight.check_config(cfg)


def test_an_inconsistent_explicit_value_is_refused_in_one_line(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "data=ct_ich", "data.context_slices=1", "data.in_channels=3")
    message = (
        r"^data\.in_channels=3 disagrees with data\.slice_channels=3 x 3 slices "
        r"\(data\.context_slices=1\) = 9; drop data\.in_channels \(it is derived\) or set it to 9$"
    )
    with pytest.raises(ConfigError, match=message):
        preflight.check_config(cfg)
    # The data module refuses it the same way when built without the preflight.
    with pytest.raises(ConfigError, match=message):
        CamSegDataModule(root=str(tmp_path), in_channels=3, slice_channels=3, context_slices=1)


def test_a_bad_slice_count_is_named(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "data=ct_ich", "data.slice_channels=0")
    with pytest.raises(ConfigError, match=r"data\.slice_channels=0: must be an integer >= 1"):
        preflight.check_config(cfg)


def test_the_fingerprint_sees_the_derived_count_not_its_source(tmp_path: Path) -> None:
    from camseg import fingerprint

    # A run recorded with the explicit in_channels=9 (before it was derived) still matches.
    derived = fingerprint.stage_config("cls", make_cfg(tmp_path, "experiment=hemorrhage"))
    explicit = fingerprint.stage_config(
        "cls", make_cfg(tmp_path, "experiment=hemorrhage", "data.in_channels=9")
    )
    assert derived["data.in_channels"] == 9
    assert "data.slice_channels" not in derived
    assert derived == explicit
