"""The three stages end to end on a tiny synthetic dataset, and the contracts between them."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from camseg.errors import CamsegError, ConfigError, ManifestError
from camseg.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[1]


def make_cfg(root: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "debug=fast",
                f"paths.root_dir={root}",
                "run_name=t",
                "data.synthetic.patients=8",
                "data.synthetic.slices_per_patient=4",
                "data.synthetic.size=48",
                "seg.net.encoder_name=resnet18",
                *overrides,
            ],
        )


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One complete pipeline run; tests copy it when they modify it."""
    root = tmp_path_factory.mktemp("pipeline")
    run_pipeline(make_cfg(root))
    return root


def copy_run(src_root: Path, dst: Path) -> Path:
    shutil.copytree(src_root, dst)
    return dst


def test_every_artifact_of_the_design_is_written(full_run: Path) -> None:
    run = full_run / "runs" / "t"
    for rel in (
        "cls/checkpoints/best.ckpt",
        "cls/checkpoints/last.ckpt",
        "cls/config.yaml",
        "cls/metrics.json",
        "pseudo/manifest.json",
        "pseudo/quality.json",
        "pseudo/threshold_sweep.png",
        "seg/checkpoints/best.ckpt",
        "seg/checkpoints/last.ckpt",
        "seg/config.yaml",
        "seg/metrics.json",
        "report.md",
    ):
        assert (run / rel).is_file(), rel
    manifest = json.loads((run / "pseudo/manifest.json").read_text())
    ids = [s["id"] for s in manifest["samples"]]
    assert ids == sorted(ids) and len(ids) > 0
    for sid in ids:
        assert (run / "pseudo/masks" / f"{sid}.png").is_file()
        cams = np.load(run / "pseudo/cams" / f"{sid}.npz")["cams"]
        assert cams.dtype == np.float16 and cams.min() >= 0 and cams.max() <= 1
    assert len(list((run / "pseudo/overlays").glob("*.png"))) == 2  # debug=fast: pseudo.overlays=2
    assert list((run / "seg/predictions").glob("*.png"))
    assert list((run / "seg/overlays").glob("*.png"))
    assert not list(run.rglob("*.tmp")), "temporary files left behind"


def test_manifest_records_provenance_and_checkpoint_hash(full_run: Path) -> None:
    run = full_run / "runs" / "t"
    m = json.loads((run / "pseudo/manifest.json").read_text())
    for key in (
        "schema_version",
        "camseg_version",
        "classifier",
        "cam",
        "policy",
        "dataset",
        "samples",
    ):
        assert key in m
    digest = hashlib.sha256((run / "cls/checkpoints/best.ckpt").read_bytes()).hexdigest()
    assert m["classifier"]["sha256"] == digest
    assert m["cam"]["scales"] == [1.0, 0.5] and m["cam"]["flip"] is True
    assert m["policy"]["fg_threshold"] == 0.3
    for s in m["samples"]:
        assert set(("id", "image", "mask", "labels", "fg_fraction")) <= set(s)
        mask = np.asarray(Image.open(run / "pseudo" / s["mask"]))
        assert set(np.unique(mask).tolist()) <= {0, 1, 255}
        assert s["fg_fraction"] == pytest.approx(np.mean(mask == 1))
        if not any(s["labels"]):
            assert not mask.any(), "a negative image must be all background"


def test_quality_dice_matches_an_independent_computation(full_run: Path) -> None:
    run = full_run / "runs" / "t"
    m = json.loads((run / "pseudo/manifest.json").read_text())
    data_root = Path(m["dataset"]["root"])
    labels = {r["image"]: r for r in _read_csv(data_root / "labels.csv")}
    tp = fp = fn = 0
    for s in m["samples"]:
        pred = np.asarray(Image.open(run / "pseudo" / s["mask"])) == 1
        gt = np.asarray(Image.open(data_root / labels[s["image"]]["mask"])) == 1
        tp += int((pred & gt).sum())
        fp += int((pred & ~gt).sum())
        fn += int((~pred & gt).sum())
    q = json.loads((run / "pseudo/quality.json").read_text())
    expected = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 1.0
    assert q["dice"] == pytest.approx(expected)
    assert q["per_class"]["hemorrhage"]["tp"] == tp
    assert len(q["sweep"]["dice"]) == len(q["sweep"]["thresholds"])
    assert q["sweep"]["best_dice"] == pytest.approx(max(q["sweep"]["dice"]))


def _read_csv(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_contains_the_metrics_it_claims(full_run: Path) -> None:
    run = full_run / "runs" / "t"
    report = (run / "report.md").read_text()
    cls_m = json.loads((run / "cls/metrics.json").read_text())
    seg_m = json.loads((run / "seg/metrics.json").read_text())
    q = json.loads((run / "pseudo/quality.json").read_text())
    auroc_row = re.search(r"^\| auroc \| (\S+) \| (\S+) \|$", report, re.M)
    assert auroc_row is not None
    assert float(auroc_row.group(2)) == pytest.approx(cls_m["test"]["test/auroc"], abs=1e-4)
    seg_row = re.search(r"^\| segmenter \| (\S+) \| (\S+) \|", report, re.M)
    assert seg_row is not None
    assert float(seg_row.group(1)) == pytest.approx(seg_m["test"]["test/dice"], abs=1e-4)
    assert f"{q['dice']:.4f}" in report
    for stage in ("cls", "pseudo", "seg"):
        assert re.search(rf"^\| {stage} \| done \|", report, re.M)


def test_case_report_agrees_with_the_stage_metrics_and_lists_every_test_image(
    full_run: Path,
) -> None:
    from test_cases import _html_case_rows

    run = full_run / "runs" / "t"
    seg_m = json.loads((run / "seg/metrics.json").read_text())
    cases = json.loads((run / "seg/cases.json").read_text())
    predictions = sorted((run / "seg/predictions").glob("*.png"))
    assert cases["num_images"] == len(predictions) == seg_m["test"]["test/num_images"]
    # Counts summed over the case rows give the stage's own dataset-level test Dice.
    tp = sum(im["classes"][0]["tp"] for im in cases["images"])
    fp = sum(im["classes"][0]["fp"] for im in cases["images"])
    fn = sum(im["classes"][0]["fn"] for im in cases["images"])
    dice = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    assert dice == pytest.approx(seg_m["test"]["test/dice"], abs=1e-6)
    assert {r["patient"] for r in cases["patients"]} == {im["patient"] for im in cases["images"]}
    page = (run / "report.html").read_text()
    assert len(_html_case_rows(page)) == len(predictions)
    report = (run / "report.md").read_text()
    assert "Test patients, worst Dice first" in report and "report.html" in report
    # The validation patients get their table too, from the segmenter's own predictions.
    val_cases = json.loads((run / "seg/cases_val.json").read_text())
    assert val_cases["num_images"] == len(list((run / "seg/predictions_val").glob("*.png"))) > 0
    assert {r["patient"] for r in val_cases["patients"]}.isdisjoint(
        {r["patient"] for r in cases["patients"]}
    )
    assert "Validation patients (" in report
    # debug=fast says its numbers are meaningless, at the top of the page.
    assert report.splitlines()[2].startswith("**Smoke test (`debug=fast`)")


def test_pseudo_resume_gives_the_same_manifest(full_run: Path, tmp_path: Path) -> None:
    root = copy_run(full_run, tmp_path / "r")
    pseudo = root / "runs" / "t" / "pseudo"
    before = json.loads((pseudo / "manifest.json").read_text())
    before["dataset"].pop("root")  # the copy lives elsewhere
    # Simulate a run killed half-way: some samples never finished, no manifest yet.
    rows = sorted((pseudo / "rows").glob("*.json"))
    for r in rows[::2]:
        r.unlink()
        (pseudo / "masks" / f"{r.stem}.png").unlink()
    (pseudo / "manifest.json").unlink()
    run_pipeline(make_cfg(root, "stages=[pseudo]"))
    after = json.loads((pseudo / "manifest.json").read_text())
    assert after["dataset"].pop("root") == str(next((root / "data").iterdir()).resolve())
    assert after == before
    assert len(list((pseudo / "rows").glob("*.json"))) == len(rows)


def test_pseudo_refuses_changed_settings_without_force(full_run: Path, tmp_path: Path) -> None:
    root = copy_run(full_run, tmp_path / "r")
    with pytest.raises(CamsegError, match=r"other settings.*force=true"):
        run_pipeline(make_cfg(root, "stages=[pseudo]", "pseudo.fg_threshold=0.5"))
    run_pipeline(make_cfg(root, "stages=[pseudo]", "pseudo.fg_threshold=0.5", "force=true"))
    m = json.loads((root / "runs/t/pseudo/manifest.json").read_text())
    assert m["policy"]["fg_threshold"] == 0.5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pseudo.fg_threshold=1.5", r"fg_threshold=1.5: must be in \[0, 1\]"),
        ("pseudo.bg_threshold=0.6", "bg_threshold must be <= fg_threshold"),
        ("cam.method=gradcam cam.target_layer=encoder.nope", "encoder.nope"),
    ],
)
def test_pseudo_bad_input_writes_nothing(
    full_run: Path, tmp_path: Path, override: str, message: str
) -> None:
    root = copy_run(full_run, tmp_path / "r")
    shutil.rmtree(root / "runs/t/pseudo")
    with pytest.raises((ConfigError, CamsegError), match=message):
        run_pipeline(make_cfg(root, "stages=[pseudo]", *override.split()))
    assert not (root / "runs/t/pseudo").exists()


def test_pseudo_refuses_a_checkpoint_of_other_classes(full_run: Path, tmp_path: Path) -> None:
    root = copy_run(full_run, tmp_path / "r")
    data = next((root / "data").iterdir())
    rows = _read_csv(data / "labels.csv")
    header = [*rows[0].keys(), "extra"]
    lines = [",".join(header)] + [",".join([*r.values(), r["hemorrhage"]]) for r in rows]
    (data / "labels.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(CamsegError, match=r"trained for classes \['hemorrhage'\]"):
        run_pipeline(make_cfg(root, "stages=[pseudo]", "force=true"))


def test_later_stage_without_earlier_one_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(CamsegError, match=r"best.ckpt not found: run stage 'cls' first"):
        run_pipeline(make_cfg(tmp_path, "stages=[pseudo]"))


def _seg_cfg(root: Path):
    return make_cfg(root, "stages=[seg]", "force=true")


def test_seg_refuses_a_tampered_checkpoint_hash(full_run: Path, tmp_path: Path) -> None:
    root = copy_run(full_run, tmp_path / "r")
    path = root / "runs/t/pseudo/manifest.json"
    m = json.loads(path.read_text())
    m["classifier"]["sha256"] = "0" * 64
    path.write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="sha256"):
        run_pipeline(_seg_cfg(root))


def test_seg_refuses_missing_mask_files(full_run: Path, tmp_path: Path) -> None:
    root = copy_run(full_run, tmp_path / "r")
    next((root / "runs/t/pseudo/masks").glob("*.png")).unlink()
    with pytest.raises(ManifestError, match="missing"):
        run_pipeline(_seg_cfg(root))


def test_seg_refuses_a_manifest_of_another_dataset(full_run: Path, tmp_path: Path) -> None:
    root = copy_run(full_run, tmp_path / "r")
    # Another synthetic dataset (other seed) under the same run: its labels differ.
    with pytest.raises(ManifestError, match="pseudo-labels are of dataset"):
        run_pipeline(make_cfg(root, "stages=[seg]", "force=true", "data.synthetic.seed=1"))


def test_seg_refuses_all_ignore_masks_and_wrong_sizes(full_run: Path, tmp_path: Path) -> None:
    root = copy_run(full_run, tmp_path / "r")
    path = root / "runs/t/pseudo/manifest.json"
    m = json.loads(path.read_text())
    victim = m["samples"][0]
    mask_path = root / "runs/t/pseudo" / victim["mask"]
    h, w = np.asarray(Image.open(mask_path)).shape
    Image.fromarray(np.full((h, w), 255, np.uint8)).save(mask_path)
    victim["ignore_fraction"] = 1.0
    path.write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=r"all ignore .*pseudo\.affinity\.min_share"):
        run_pipeline(_seg_cfg(root))
    Image.fromarray(np.zeros((h + 3, w), np.uint8)).save(mask_path)
    victim["ignore_fraction"] = 0.0
    path.write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=rf"is {w}x{h + 3} but image"):
        run_pipeline(_seg_cfg(root))


def _cam_overlay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "cam_overlay.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cam_overlay_script_draws_one_titled_heatmap_per_class(
    full_run: Path, tmp_path: Path
) -> None:
    ckpt = full_run / "runs/t/cls/checkpoints/best.ckpt"
    manifest = json.loads((full_run / "runs/t/pseudo/manifest.json").read_text())
    sample = manifest["samples"][0]
    image = Path(manifest["dataset"]["root"]) / sample["image"]
    out = tmp_path / "cam.png"
    res = _cam_overlay(
        "--ckpt", str(ckpt), "--image", str(image), "--method", "gradcam", "--out", str(out)
    )
    assert res.returncode == 0, res.stderr
    classes = manifest["dataset"]["classes"]
    for name in classes:
        assert re.search(rf"^{name}: p=0\.\d{{3}}$|^{name}: p=1\.000$", res.stdout, re.M), (
            res.stdout
        )
    src = np.asarray(Image.open(image))
    pic = np.asarray(Image.open(out))
    h, w = src.shape[:2]
    k = len(classes)
    assert pic.shape[1] == (k + 1) * w + 4 * k  # image, then one column per class
    assert pic.shape[0] > h  # the title strip
    body = pic[pic.shape[0] - h :]
    grey = np.repeat(src[..., None], 3, axis=2) if src.ndim == 2 else src
    np.testing.assert_array_equal(body[:, :w], grey)  # the first column is the image itself
    assert not np.array_equal(body[:, w + 4 : 2 * w + 4], grey)  # the heatmap is drawn over it


def test_cam_overlay_script_refuses_bad_input_in_one_line(full_run: Path, tmp_path: Path) -> None:
    ckpt = full_run / "runs/t/cls/checkpoints/best.ckpt"
    image = next((full_run / "data").rglob("*.png"))
    missing = _cam_overlay("--ckpt", str(tmp_path / "none.ckpt"), "--image", str(image))
    assert (
        missing.returncode == 2 and "--ckpt" in missing.stderr and "no such file" in missing.stderr
    )
    layer = _cam_overlay(
        "--ckpt",
        str(ckpt),
        "--image",
        str(image),
        "--method",
        "gradcam",
        "--target-layer",
        "no.such.layer",
        "--out",
        str(tmp_path / "x.png"),
    )
    assert layer.returncode == 2, layer.stderr
    assert layer.stderr.startswith("cam_overlay.py: error:") and "no.such.layer" in layer.stderr
    assert "Traceback" not in layer.stderr
    assert not (tmp_path / "x.png").exists()


def test_a_stage_run_alone_reproduces_its_result_in_the_full_pipeline(
    full_run: Path, tmp_path: Path
) -> None:
    """Each stage starts from the seed: retraining the segmenter alone (same seed, same
    pseudo-masks) writes the numbers the full cls -> pseudo -> seg run wrote."""
    root = copy_run(full_run, tmp_path / "copy")
    before = json.loads((root / "runs/t/seg/metrics.json").read_text())
    run_pipeline(make_cfg(root, "stages=[seg]", "force=true"))
    after = json.loads((root / "runs/t/seg/metrics.json").read_text())
    for key in ("val", "test", "train_pseudo_vs_seg"):
        assert after[key] == before[key], key


def test_images_of_different_sizes_go_through_all_three_stages(kit, tmp_path: Path) -> None:
    """Patients scanned at 48 and at 64 px: pseudo-masks and predictions come back at each
    image's own size."""
    small = kit.tiny_records(patients=4, size=48, seed=0)
    large = kit.tiny_records(patients=4, size=64, seed=1)
    for r in large:
        r.name, r.group = "L" + r.name, "L" + r.group
    data = kit.write(tmp_path / "mixed", small + large, ["lesion"])
    root = tmp_path / "root"
    run_pipeline(
        make_cfg(
            root,
            "data=default",
            f"data.root={data}",
            "data.image_size=48",
            "data.in_channels=1",
            "data.num_workers=0",
            "model.monitor=val/loss",
            "model.monitor_mode=min",
        )
    )
    run = root / "runs/t"
    manifest = json.loads((run / "pseudo/manifest.json").read_text())
    sizes = set()
    for row in manifest["samples"]:
        image = Image.open(data / row["image"])
        mask = Image.open(run / "pseudo" / row["mask"])
        assert mask.size == image.size, row["id"]
        sizes.add(image.size)
    assert sizes == {(48, 48), (64, 64)}
    for pred in (run / "seg/predictions").glob("*.png"):
        stem = pred.stem
        original = Image.open(data / "images" / f"{stem}.png")
        assert Image.open(pred).size == original.size, stem


def test_best_round_follows_the_monitor_and_its_mode() -> None:
    from camseg.seg.stage import best_round

    rounds = [{"round": 1, "m": 0.70}, {"round": 2, "m": 0.65}, {"round": 3, "m": 0.70}]
    assert best_round(rounds, "m", "max") == 1  # the earliest of the tied best
    assert best_round(rounds, "m", "min") == 2
    assert best_round([*rounds, {"round": 4, "m": float("nan")}], "m", "max") is None
    assert best_round([{"round": 1}], "m", "max") is None  # no validation score


def test_null_eval_batch_size_means_the_training_batch_size(
    full_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.eval_batch_size=null (which pseudo.batch_size follows) used to crash stage 2 on
    int(None); null means data.batch_size, as seg.batch_size=null does."""
    from camseg.data.datamodule import CamSegDataModule

    sizes: list[int] = []
    loader = CamSegDataModule._loader

    def spy(self, ds, shuffle, batch_size, split=None):  # type: ignore[no-untyped-def]
        sizes.append(batch_size)
        return loader(self, ds, shuffle, batch_size, split)

    monkeypatch.setattr(CamSegDataModule, "_loader", spy)
    root = copy_run(full_run, tmp_path / "r")
    cfg = make_cfg(root, "stages=[pseudo]", "force=true", "data.eval_batch_size=null")
    assert cfg.pseudo.batch_size is None and cfg.data.batch_size == 8
    run_pipeline(cfg)
    assert sizes and set(sizes) == {8}
    manifest = json.loads((root / "runs/t/pseudo/manifest.json").read_text())
    original = json.loads((full_run / "runs/t/pseudo/manifest.json").read_text())
    assert [s["id"] for s in manifest["samples"]] == [s["id"] for s in original["samples"]]
