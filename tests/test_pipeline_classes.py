"""The three stages with several classes: multi-label (sigmoid, negatives and images with
both classes) and multi-class (softmax, one class per image).

Class 1 ``disc`` is a bright disc, class 2 ``bar`` a bright horizontal bar; the ground-truth
mask marks each with its class index. Every assertion is an invariant of the pseudo-mask
policy or of the artifacts' contracts, checked on every written file.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from camseg.constants import IGNORE_INDEX
from camseg.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[1]
SIZE = 48
CLASSES = ["disc", "bar"]


def write_two_class_dataset(root: Path, multilabel: bool, patients: int = 8) -> Path:
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:SIZE, :SIZE]
    # multi-label: none, disc, bar, both; multi-class: exactly one of them.
    combos = [(0, 0), (1, 0), (0, 1), (1, 1)] if multilabel else [(1, 0), (0, 1)]
    rows = []
    for p in range(patients):
        for s in range(4):
            disc, bar = combos[(p + s) % len(combos)]
            image = rng.integers(20, 60, (SIZE, SIZE), dtype=np.uint8)
            mask = np.zeros((SIZE, SIZE), np.uint8)
            if disc:
                cy, cx = rng.integers(10, SIZE - 10, 2)
                region = (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
                image[region], mask[region] = 220, 1
            if bar:
                y0 = int(rng.integers(4, SIZE - 8))
                region = (yy >= y0) & (yy < y0 + 4) & (mask == 0)
                image[region], mask[region] = 160, 2
            name = f"P{p}_{s}"
            Image.fromarray(image).save(root / "images" / f"{name}.png")
            Image.fromarray(mask).save(root / "masks" / f"{name}.png")
            rows.append([f"images/{name}.png", f"masks/{name}.png", f"P{p}", s, disc, bar])
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "mask", "group", "slice", *CLASSES])
        w.writerows(rows)
    return root


@pytest.fixture(scope="module", params=[True, False], ids=["multilabel", "multiclass"])
def two_class_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    multilabel = bool(request.param)
    root = tmp_path_factory.mktemp("two-class")
    data = write_two_class_dataset(root / "data", multilabel)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "debug=fast",
                f"paths.root_dir={root}",
                "run_name=k2",
                "data=default",
                f"data.root={data}",
                f"data.image_size={SIZE}",
                "data.in_channels=1",
                "data.num_workers=0",
                f"model.multilabel={multilabel}",
                "model.monitor=val/loss",
                "model.monitor_mode=min",
                "seg.net.encoder_name=resnet18",
            ],
        )
    run_pipeline(cfg)
    return root / "runs" / "k2", data, multilabel


def test_pseudo_masks_hold_only_the_image_label_classes(two_class_run) -> None:
    run, data, multilabel = two_class_run
    manifest = json.loads((run / "pseudo/manifest.json").read_text())
    assert manifest["dataset"]["classes"] == CLASSES
    with open(data / "labels.csv", newline="") as f:
        truth = {r["image"]: [int(r[c]) for c in CLASSES] for r in csv.DictReader(f)}
    assert manifest["samples"]
    seen: set[int] = set()
    for row in manifest["samples"]:
        assert row["labels"] == truth[row["image"]]
        mask = np.asarray(Image.open(run / "pseudo" / row["mask"]))
        assert mask.shape == (SIZE, SIZE)
        allowed = {0, IGNORE_INDEX} | {k + 1 for k, on in enumerate(row["labels"]) if on}
        assert set(np.unique(mask).tolist()) <= allowed, (row["id"], row["labels"])
        if not any(row["labels"]):
            assert not mask.any(), "a negative image is all background"
        seen |= set(np.unique(mask).tolist())
        cams = np.load(run / "pseudo/cams" / f"{row['id']}.npz")["cams"]
        assert cams.shape == (len(CLASSES), SIZE, SIZE)
        assert float(cams.min()) >= 0.0 and float(cams.max()) <= 1.0
    assert {1, 2} <= seen, "both classes become foreground somewhere"
    if multilabel:
        assert any(all(r["labels"]) for r in manifest["samples"])
        assert any(not any(r["labels"]) for r in manifest["samples"])
    else:
        assert all(sum(r["labels"]) == 1 for r in manifest["samples"])


def test_quality_and_segmenter_metrics_cover_both_classes(two_class_run) -> None:
    run, _, _ = two_class_run
    quality = json.loads((run / "pseudo/quality.json").read_text())
    assert quality["classes"] == CLASSES and sorted(quality["per_class"]) == sorted(CLASSES)
    for name in CLASSES:
        assert 0.0 <= quality["per_class"][name]["dice"] <= 1.0
    seg = json.loads((run / "seg/metrics.json").read_text())
    for name in CLASSES:
        assert 0.0 <= seg["test"][f"test/dice_{name}"] <= 1.0, sorted(seg["test"])
        assert f"val/iou_{name}" in seg["val"]
    predictions = sorted((run / "seg/predictions").glob("*.png"))
    assert predictions
    for p in predictions:
        assert set(np.unique(np.asarray(Image.open(p))).tolist()) <= {0, 1, 2}
