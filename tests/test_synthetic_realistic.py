"""The realistic-hemorrhage preset: determinism, label rate, lesion areas, shapes, CT windows.

Statistics are computed here from the written masks and images, independently of the
generator's own bookkeeping (only ``lesions.csv`` names each lesion's kind).
"""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image
from scipy import ndimage

from camseg.data.cli import main as data_cli
from camseg.data.datamodule import CamSegDataModule
from camseg.data.folder import validate_root
from camseg.data.synthetic import LESIONS_CSV, generate, generate_if_asked, min_lesion_area
from camseg.data.synthetic_presets import (
    CT_WINDOWS,
    LESION_KINDS,
    render_realistic_volume,
    slice_labels,
)
from camseg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PRESET = "realistic-hemorrhage"
CRESCENTS = ("subdural", "epidural")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _hu_level(hu: float, window: int) -> float:
    """Display value of ``hu`` in CT_WINDOWS[window] (unclipped)."""
    w = CT_WINDOWS[window]
    return (hu - w.low) / w.width * 255.0


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    args = {"preset": PRESET, "patients": 3, "slices_per_patient": 6, "size": 48}
    a = _files(generate(tmp_path / "a", seed=3, **args))
    b = _files(generate(tmp_path / "b", seed=3, **args))
    c = _files(generate(tmp_path / "c", seed=4, **args))
    assert {"labels.csv", "README.md", LESIONS_CSV} <= a.keys()
    assert a == b
    assert sum(a[k] != c[k] for k in a if k.startswith("images/")) == 18


def test_format_rgb_windows_labels_and_side_record(tmp_path: Path) -> None:
    root = generate(tmp_path / "ds", preset=PRESET, patients=4, slices_per_patient=8, size=64)
    index = validate_root(root)
    assert index.classes == ["hemorrhage"]
    readme = (root / "README.md").read_text()
    assert 'preset="realistic-hemorrhage"' in readme and "lesion_prob=0.12" in readme
    rows = _rows(root / "labels.csv")
    assert len(rows) == 32
    assert any(r["hemorrhage"] == "1" for r in rows if r["group"] == "P000")  # forced
    assert any(r["hemorrhage"] == "0" for r in rows if r["group"] == "P001")
    area = {}
    for r in rows:
        with Image.open(root / r["image"]) as im:
            assert (im.mode, im.size) == ("RGB", (64, 64))
        mask = np.asarray(Image.open(root / r["mask"]))
        assert set(np.unique(mask).tolist()) <= {0, 1}
        assert r["hemorrhage"] == str(int(mask.any()))  # negatives: all-zero masks
        area[r["image"]] = int(mask.sum())
    lesions = _rows(root / LESIONS_CSV)
    assert {r["kind"] for r in lesions} <= set(LESION_KINDS)
    per_image = Counter()
    for r in lesions:
        per_image[r["image"]] += int(r["pixels"])
    # Every positive image has lesion records adding up to at least its mask (a union).
    assert {k for k, v in area.items() if v} == set(per_image)
    assert all(per_image[k] >= area[k] > 0 for k in per_image)


def test_positive_rate_is_about_twelve_percent_and_clustered_in_patients() -> None:
    labels = np.array(
        [slice_labels(np.random.SeedSequence(0, spawn_key=(i,)), 24, 0.12) for i in range(2000)]
    )
    assert 0.10 <= labels.mean() <= 0.14
    # Real bleeds are per patient: about 40-55 % of the patients have none at all.
    assert 0.4 <= (~labels.any(axis=1)).mean() <= 0.65
    assert slice_labels(np.random.SeedSequence(0, spawn_key=(5,)), 24, 0.0).sum() == 0
    # Above the preset's rate every patient bleeds and the runs grow.
    high = [slice_labels(np.random.SeedSequence(0, spawn_key=(i,)), 24, 0.5) for i in range(300)]
    assert 0.4 <= np.mean(high) <= 0.6


@pytest.fixture(scope="module")
def bleeding_patients() -> list[tuple[int, np.ndarray, np.ndarray, list]]:
    """Every patient with a bleed among the first 90 (seed 0, 24 slices, 80 px): ~40 patients."""
    out = []
    for i in range(90):
        seq = np.random.SeedSequence(0, spawn_key=(i,))
        if slice_labels(seq, 24, 0.12).any():
            out.append((i, *render_realistic_volume(seq, 24, 80, 0.12)))
    return out


def test_lesion_area_quantiles_match_real_head_ct(bleeding_patients: list) -> None:
    fractions = np.concatenate(
        [m.reshape(len(m), -1).mean(axis=1) for _, _, m, _ in bleeding_patients]
    )
    positive = fractions[fractions > 0] * 100  # percent of the slice
    p10, p50, p90 = np.quantile(positive, [0.1, 0.5, 0.9])
    print(f"areas (%): n={positive.size} p10={p10:.3f} median={p50:.3f} p90={p90:.3f}")
    # Real CT-ICH: p10 0.10 %, median 0.42 %, p90 1.6 %. Bands for ~250 slices of ~40 bleeds.
    assert positive.size > 150
    assert 0.06 <= p10 <= 0.17
    assert 0.25 <= p50 <= 0.65
    assert 1.0 <= p90 <= 2.5
    assert positive.max() <= 3.2
    # The plain generator's minimum lesion area does not apply: many bleeds are smaller.
    assert (positive < 100 * min_lesion_area(80) / 80**2).mean() > 0.3


def test_each_kind_has_its_shape(bleeding_patients: list) -> None:
    """Crescents touch the inner table, intraventricular blood lies in CSF, blobs in brain."""
    kinds: Counter[str] = Counter()
    checked: Counter[str] = Counter()
    for i, _images, masks, records in bleeding_patients:
        by_slice: dict[int, set[str]] = {}
        for r in records:
            kinds[r.kind] += 1
            by_slice.setdefault(r.slice, set()).add(r.kind)
        # The same anatomy without lesions: lesions come from their own random stream.
        clean, _, _ = render_realistic_volume(
            np.random.SeedSequence(0, spawn_key=(i,)), 24, 80, 0.0
        )
        for z, ks in by_slice.items():
            if len(ks) != 1:
                continue
            (kind,) = ks
            mask, img = masks[z].astype(bool), clean[z]
            skull = img[..., 2] >= _hu_level(300, 2)
            near_table = ndimage.binary_dilation(skull, iterations=2)
            csf = img[..., 0] < _hu_level(20, 0)
            assert not (mask & skull).any(), (i, z, kind)
            if kind in CRESCENTS:
                assert (mask & near_table).any(), (i, z, kind)
            elif kind == "intraventricular":
                assert (mask & csf).sum() >= 0.7 * mask.sum(), (i, z, kind)
                assert not (mask & near_table).any(), (i, z, kind)
            else:
                assert not (mask & near_table).any(), (i, z, kind)
            checked[kind] += 1
    print("lesion-slices per kind:", dict(kinds))
    assert set(kinds) == set(LESION_KINDS)
    assert all(checked[k] >= 3 for k in LESION_KINDS), checked
    assert kinds["subdural"] + kinds["intraparenchymal"] > kinds["epidural"]


def test_three_ct_windows_as_rgb(bleeding_patients: list) -> None:
    """Brain/subdural windows saturate on bone, the bone window does not; blood shows in brain."""
    contrast = []
    for _, images, masks, records in bleeding_patients[:15]:
        for z in {r.slice for r in records if r.kind == "intraparenchymal"}:
            img, mask = images[z].astype(np.float32), masks[z].astype(bool)
            skull = img[..., 2] >= _hu_level(500, 2)
            assert (img[..., 0][skull] == 255).mean() > 0.95
            assert (img[..., 1][skull] == 255).mean() > 0.95
            assert (img[..., 2][skull] < 255).mean() > 0.95
            air = img[..., 2] == 0
            assert air.mean() > 0.3 and (img[air][:, :2] == 0).all()
            ring = ndimage.binary_dilation(mask, iterations=3) & ~ndimage.binary_dilation(mask)
            ring &= ~ndimage.binary_dilation(skull, iterations=3) & (img[..., 0] > 20)
            contrast.append(img[..., 0][mask].mean() - img[..., 0][ring].mean())
    contrast_arr = np.array(contrast)
    print(
        "brain-window lesion contrast (levels):", np.round(np.quantile(contrast_arr, [0, 0.5, 1]))
    )
    # Hyperdense by a modest margin: 15-50 HU above brain is 48-160 levels of the brain window,
    # less after blur; never the saturated contrast of bone.
    assert contrast_arr.size >= 5
    assert 25 <= np.median(contrast_arr) <= 150
    assert contrast_arr.max() < 200


def test_cli_preset_and_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["synth", "--preset", PRESET, "--out", str(out), "--patients", "2"]
    assert data_cli([*argv, "--slices-per-patient", "3", "--size", "40", "--seed", "1"]) == 0
    assert "realistic-hemorrhage dataset written" in capsys.readouterr().out
    readme = (out / "README.md").read_text()
    for text in ("patients=2", "slices_per_patient=3", "size=40", "seed=1", "lesion_prob=0.12"):
        assert text in readme
    with Image.open(out / "images/P000_000.png") as im:
        assert (im.mode, im.size) == ("RGB", (40, 40))
    bad = ["synth", "--preset", PRESET, "--out", str(tmp_path / "bad"), "--flavor", "nodule"]
    assert data_cli(bad) == 2
    assert "renders flavor 'hemorrhage'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="preset 'nope' is unknown"):
        generate(tmp_path / "x", preset="nope")


def test_hydra_experiment_generates_the_preset_on_first_use(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "experiment=realistic_hemorrhage",
                f"paths.root_dir={tmp_path}",
                "data.synthetic.patients=3",
                "data.synthetic.slices_per_patient=4",
                "data.synthetic.size=48",
                "data.num_workers=0",
            ],
        )
    assert cfg.data.in_channels == 3 and cfg.data.image_size == 256
    assert cfg.model.net.output_stride == 8 and cfg.model.net.pretrained is False
    assert cfg.data.context_slices == 0 and cfg.seg.net.encoder_weights is None
    root = Path(cfg.data.root)
    assert root.parent == tmp_path / "data" and "realistic-hemorrhage" in root.name
    dm = CamSegDataModule(
        root=str(root),
        in_channels=3,
        image_size=32,
        mean=[0.2] * 3,
        std=[0.3] * 3,
        num_workers=0,
        synthetic=dict(cfg.data.synthetic),
        data_dir=cfg.data.data_dir,
    )
    dm.setup()
    assert (root / LESIONS_CSV).is_file() and len(dm.samples("all")) == 12
    assert not generate_if_asked(root, dict(cfg.data.synthetic), cfg.data.data_dir)


@pytest.mark.slow
def test_realistic_hemorrhage_end_to_end(tmp_path: Path) -> None:
    """experiment=realistic_hemorrhage, shrunk: prints and records pseudo-mask and segmenter Dice.

    No Dice floor: this data exists to show where a recipe fails. A stage-2 stop for
    pseudo-masks without foreground (where the pipeline has one) is a valid outcome.
    """
    from camseg.errors import CamsegError
    from camseg.pipeline import run_pipeline

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "experiment=realistic_hemorrhage",
                f"paths.root_dir={tmp_path}",
                "run_name=rh",
                "data.synthetic.patients=16",
                "data.synthetic.slices_per_patient=16",
                "data.synthetic.size=256",
                "data.image_size=128",
                "data.num_workers=0",
                "model.max_epochs=4",
                "seg.max_epochs=4",
                "cam.scales=[1.0]",
                "pseudo.overlays=2",
                "seg.overlays=2",
                "callbacks=minimal",
                "logger=csv",
                "trainer.accelerator=cpu",
                "trainer.enable_progress_bar=false",
            ],
        )
    t0 = time.time()
    stopped = None
    try:
        run_pipeline(cfg)
    except CamsegError as e:  # e.g. pseudo.min_positive_coverage: no foreground on positives
        stopped = str(e)
    run = tmp_path / "runs" / "rh"
    quality_path, seg_path = run / "pseudo/quality.json", run / "seg/metrics.json"
    quality = json.loads(quality_path.read_text()) if quality_path.is_file() else {}
    seg = json.loads(seg_path.read_text()) if seg_path.is_file() else {}
    record = {
        "pseudo_dice": quality.get("dice"),
        "pseudo_best_sweep_dice": quality.get("sweep", {}).get("best_dice"),
        "segmenter_test_dice": seg.get("test", {}).get("test/dice"),
        "stopped": stopped,
        "wall_s": round(time.time() - t0, 1),
    }
    (tmp_path / "realistic_e2e.json").write_text(json.dumps(record, indent=2))
    print("realistic-hemorrhage end to end:", json.dumps(record))
    assert quality_path.is_file()
    assert stopped is not None or record["segmenter_test_dice"] is not None
