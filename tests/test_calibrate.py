"""pseudo.calibrate: the policy is chosen on the validation patients' masks, never the test ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from camseg.cam import PseudoMaskPolicy
from camseg.errors import CamsegError, ConfigError
from camseg.pipeline import run_pipeline
from camseg.pseudo.calibrate_search import ValidationSet, search
from camseg.units import Grid, calibrate_mode

REPO = Path(__file__).resolve().parents[1]
NO_CRF = {"crf_bg_powers": ()}


def _val_set() -> ValidationSet:
    """Two positive 16 px images: CAM 0.55 on the lesion, 0.35 in a ring around it, 0 elsewhere."""
    cams = torch.zeros(2, 1, 16, 16)
    gt = torch.zeros(2, 16, 16, dtype=torch.uint8)
    cams[:, 0, 3:11, 3:11] = 0.35
    cams[:, 0, 5:9, 5:9] = 0.55
    gt[:, 5:9, 5:9] = 1
    images = torch.zeros(2, 1, 16, 16, dtype=torch.uint8)
    negatives = torch.tensor([[0, 0, 0]])  # (K,3): a negative image without lesion pixels
    return ValidationSet([(cams, torch.ones(2, 1), images, gt)], negatives, 1, 3, 2, 2)


def test_search_finds_the_threshold_between_ring_and_lesion() -> None:
    grid = Grid(rules=("absolute",), min_component_sizes=(0.0,), **NO_CRF)
    configured = PseudoMaskPolicy(fg_threshold=0.3, bg_threshold=0.05)
    found = search(_val_set(), grid, configured, with_crf=False)
    chosen = found["policy"]
    # 0.4 and 0.5 both separate 0.55 from 0.35 perfectly: the first of equals wins
    assert (chosen.fg_threshold, chosen.threshold_rule, chosen.crf) == (0.4, "absolute", None)
    assert found["val_dice"] == 1.0
    # configured: 0.3 takes the ring too: Dice = 2*16 / (2*16 + 48) per image
    assert found["configured_val_dice"] == pytest.approx(32 / 80)
    # bg: the largest candidate <= 0.4 that marks no lesion pixel background (all 0.55 >= 0.3)
    assert chosen.bg_threshold == 0.3
    assert len(found["table"]) == 6
    by_fg = {r["fg_threshold"]: r["dice"] for r in found["table"]}
    assert by_fg[0.2] == pytest.approx(32 / 80) and by_fg[0.6] == 0.0


def test_background_threshold_keeps_missed_lesion_pixels_low() -> None:
    val = _val_set()
    cams, labels, images, gt = val.groups[0]
    cams = cams.clone()
    cams[:, 0, 5, 5:9] = 0.15  # a quarter of the lesion pixels (4 of 16) is dim
    val.groups[0] = (cams, labels, images, gt)
    grid = Grid(
        rules=("absolute",), min_component_sizes=(0.0,), max_missed_as_background=0.1, **NO_CRF
    )
    found = search(val, grid, PseudoMaskPolicy(), with_crf=False)
    missed = {r["bg_threshold"]: r["missed_as_background"] for r in found["bg_search"]}
    assert missed[0.3] == pytest.approx(0.25) and missed[0.2] == pytest.approx(0.25)
    assert missed[0.1] == 0.0
    assert found["policy"].bg_threshold == 0.1


def test_relative_rules_are_searched_too() -> None:
    """Image 2's CAM is half as strong: only max_fraction finds both lesions with one threshold."""
    val = _val_set()
    cams, labels, images, gt = val.groups[0]
    cams = cams.clone()
    cams[1] *= 0.5
    val.groups[0] = (cams, labels, images, gt)
    grid = Grid(rules=("absolute", "max_fraction"), min_component_sizes=(0.0,), **NO_CRF)
    found = search(val, grid, PseudoMaskPolicy(), with_crf=False)
    assert found["policy"].threshold_rule == "max_fraction" and found["val_dice"] == 1.0
    best_absolute = max(r["dice"] for r in found["table"] if r["rule"] == "absolute")
    assert best_absolute < 1.0


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"rules": ["otsu"]}, "pseudo.calibration.rules: 'otsu' is not one of"),
        ({"fg_thresholds": [1.5]}, r"pseudo.calibration.fg_thresholds: 1.5 is not in \[0, 1\]"),
        ({"fg_thresholds": []}, "pseudo.calibration.fg_thresholds is empty"),
        ({"min_component_sizes": [20]}, "pseudo.min_component_size=20: a fraction"),
        ({"crf_bg_power": [1]}, r"pseudo.calibration: unknown key\(s\) \['crf_bg_power'\]"),
    ],
)
def test_bad_grids_are_one_line_config_errors(node: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        Grid.from_config(node)
    assert "\n" not in str(info.value)


def test_calibrate_mode() -> None:
    assert [calibrate_mode(v) for v in (False, True, "auto", None)] == [
        "false",
        "true",
        "auto",
        "false",
    ]
    with pytest.raises(ConfigError, match=r"pseudo\.calibrate=yes: use true, false or auto"):
        calibrate_mode("yes")


# -- end to end on a tiny folder dataset ------------------------------------------------------


def _cfg(root: Path, data: Path, *extra: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "debug=fast",
                f"paths.root_dir={root}",
                "run_name=t",
                "data=default",
                f"data.root={data}",
                "data.image_size=32",
                "data.in_channels=1",
                "data.num_workers=0",
                "data.val_fraction=0.25",
                "data.test_fraction=0.25",
                "seg.net.encoder_name=resnet18",
                "pseudo.min_positive_coverage=0",
                "pseudo.calibration.fg_thresholds=[0.3,0.5,0.7]",
                "pseudo.calibration.crf_bg_powers=[0.5]",
                *extra,
            ],
        )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_records, write_dataset

    base = tmp_path_factory.mktemp("calibrate")
    data = write_dataset(base / "data", tiny_records(patients=8, size=32), ["lesion"])
    run_pipeline(_cfg(base / "root", data, "stages=[cls]"))
    return base / "root", data


def _calibration(root: Path) -> dict:
    return json.loads((root / "runs/t/pseudo/calibration.json").read_text())


def _blank_masks(data: Path, group: str) -> None:
    for p in (data / "masks").glob(f"{group}_*.png"):
        m = np.asarray(Image.open(p))
        Image.fromarray(np.where(m > 0, 0, 1).astype(np.uint8), mode="L").save(p)  # inverted


def test_calibration_end_to_end_uses_validation_never_test(trained, tmp_path: Path) -> None:
    pytest.importorskip("pydensecrf.densecrf")
    import shutil

    from camseg.cls.stage import build_datamodule

    root, data0 = trained
    data = tmp_path / "data"
    shutil.copytree(data0, data)
    run_pipeline(_cfg(root, data, "stages=[pseudo]", "pseudo.calibrate=true", "force=true"))
    first = _calibration(root)
    manifest = json.loads((root / "runs/t/pseudo/manifest.json").read_text())
    assert manifest["calibration"]["status"] == "calibrated"
    chosen = {k: v for k, v in manifest["policy"].items() if k != "ignore_index"}
    assert manifest["calibration"]["chosen"] == chosen
    # Dice does not see the background threshold: the chosen policy scores the table's best
    assert manifest["calibration"]["val_dice"] == max(r["dice"] for r in first["table"])
    assert len(first["table"]) == first["candidates"] == 2 * 3 * 3 * 3  # crf x rules x fg x sizes
    assert (root / "runs/t/pseudo/calibration.png").is_file()
    report = (root / "runs/t/report.md").read_text()
    assert "Policy calibration" in report and "validation Dice" in report
    dm = build_datamodule(_cfg(root, data))
    dm.setup()
    test_groups = sorted({s.group for s in dm.samples("test")})
    val_groups = sorted({s.group for s in dm.samples("val")})
    assert test_groups and val_groups and not set(test_groups) & set(val_groups)
    # A test patient's masks change: the search does not move.
    _blank_masks(data, test_groups[0])
    run_pipeline(_cfg(root, data, "stages=[pseudo]", "pseudo.calibrate=true", "force=true"))
    assert _calibration(root)["table"] == first["table"]
    assert _calibration(root)["chosen"] == first["chosen"]
    # A validation patient's masks change: it does.
    _blank_masks(data, val_groups[0])
    run_pipeline(_cfg(root, data, "stages=[pseudo]", "pseudo.calibrate=true", "force=true"))
    assert _calibration(root)["table"] != first["table"]


def test_without_validation_masks(trained, tmp_path: Path) -> None:
    import csv
    import shutil

    root, data0 = trained
    data = tmp_path / "data"
    shutil.copytree(data0, data)
    with open(data / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["mask"] = ""
    with open(data / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(
        CamsegError, match=r"pseudo\.calibrate=true: no validation image .* ground-truth mask"
    ):
        run_pipeline(_cfg(root, data, "stages=[pseudo]", "pseudo.calibrate=true", "force=true"))
    run_pipeline(_cfg(root, data, "stages=[pseudo]", "pseudo.calibrate=auto", "force=true"))
    manifest = json.loads((root / "runs/t/pseudo/manifest.json").read_text())
    assert manifest["calibration"]["status"] == "skipped"
    assert manifest["policy"]["fg_threshold"] == 0.3  # the configured policy
    assert "NOT calibrated" in (root / "runs/t/report.md").read_text()


def test_stages_recorded_before_the_new_keys_stay_valid() -> None:
    """cv.*, threshold_rule and calibration.* at their defaults behave as their absence did."""
    from camseg import fingerprint

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=synthetic"])
        lgg = compose("config", overrides=["experiment=lgg_mri"])
    new_keys = ("data.cv_", "pseudo.threshold_rule", "pseudo.calibrat")
    for stage in ("cls", "pseudo", "seg"):
        now = fingerprint.stage_config(stage, cfg)
        before = {k: v for k, v in now.items() if not k.startswith(new_keys)}
        assert fingerprint.diff(before, now) == []
    # The LGG recipe refines by affinity and does not calibrate (the walk's masks do not use
    # the thresholds calibration picks): the new keys sit at their defaults there too.
    assert lgg.pseudo.refine == "affinity" and lgg.pseudo.calibrate is False
    for stage in ("cls", "pseudo"):
        now = fingerprint.stage_config(stage, lgg)
        before = {k: v for k, v in now.items() if not k.startswith(new_keys)}
        assert fingerprint.diff(before, now) == []
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config", overrides=["experiment=lgg_mri", "cv.fold=1", "pseudo.calibrate=true"]
        )
    now = fingerprint.stage_config("pseudo", cfg)
    before = {k: v for k, v in now.items() if not k.startswith(new_keys)}
    changed = {c.key for c in fingerprint.diff(before, now)}
    assert {"data.cv_fold", "pseudo.calibrate"} <= changed
