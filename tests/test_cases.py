"""Case-by-case evaluation (camseg.seg.cases), the per-patient report and report.html."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from camseg.seg.cases import (
    evaluate_image,
    lesion_counts,
    patient_rows,
    roc_curve,
    surface_metrics,
)


def _square(size: int, top: int, left: int, side: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[top : top + side, left : left + side] = True
    return m


def _independent_hd95(a: np.ndarray, b: np.ndarray) -> float:
    """Directed boundary distances by scipy's exact Euclidean distance transform."""

    def edge(m: np.ndarray) -> np.ndarray:
        return m & ~ndimage.binary_erosion(m, structure=np.ones((3, 3)), border_value=0)

    ea, eb = edge(a), edge(b)
    da = ndimage.distance_transform_edt(~eb)[ea]
    db = ndimage.distance_transform_edt(~ea)[eb]
    return max(
        float(np.percentile(da, 95, method="linear")), float(np.percentile(db, 95, method="linear"))
    )


def test_identical_masks_have_zero_hd95_and_full_surface_dice() -> None:
    m = _square(32, 8, 8, 10)
    s = surface_metrics(m, m, tolerance=1.0)
    assert s.hd95 == 0.0 and s.surface_dice == 1.0


@pytest.mark.parametrize("shift", [1, 3, 6])
def test_hd95_of_a_shifted_square_matches_a_distance_transform(shift: int) -> None:
    a, b = _square(48, 10, 10, 16), _square(48, 10, 10 + shift, 16)
    got = surface_metrics(a, b, tolerance=1.0).hd95
    assert got == pytest.approx(_independent_hd95(a, b), abs=0.5)
    assert got == pytest.approx(shift, abs=0.5)


def test_surface_dice_grows_with_the_tolerance_and_empty_cases_follow_the_rule() -> None:
    a, b = _square(48, 10, 10, 16), _square(48, 10, 14, 16)
    tight, loose = surface_metrics(a, b, 1.0).surface_dice, surface_metrics(a, b, 4.0).surface_dice
    assert 0.0 < tight < loose == 1.0
    empty = np.zeros((8, 8), dtype=bool)
    assert surface_metrics(empty, empty, 1.0).surface_dice == 1.0
    one_sided = surface_metrics(a, np.zeros_like(a), 1.0)
    assert one_sided.surface_dice == 0.0 and one_sided.hd95 == float("inf")


def test_lesions_are_counted_as_connected_components() -> None:
    gt = _square(40, 2, 2, 5) | _square(40, 20, 20, 5) | _square(40, 30, 2, 3)
    pred = _square(40, 4, 4, 2) | _square(40, 10, 30, 4)  # touches lesion 1; one false blob
    assert lesion_counts(pred, gt) == {"lesions": 3, "hit": 1, "missed": 2, "false": 1}
    # Diagonal neighbours belong to one lesion (8-connectivity).
    diag = np.zeros((6, 6), dtype=bool)
    diag[1, 1] = diag[2, 2] = True
    assert lesion_counts(diag, diag)["lesions"] == 1


def test_image_error_types_and_counts_agree_with_the_masks() -> None:
    gt = _square(20, 5, 5, 5).astype(np.uint8)
    pred = np.zeros_like(gt)
    pred[5:10, 7:12] = 1
    c = evaluate_image(pred, gt, 1)["classes"][0]
    assert (c["tp"], c["fp"], c["fn"]) == (15, 10, 10)
    assert c["dice"] == pytest.approx(2 * 15 / (2 * 15 + 20)) and c["error"] == "tp"
    assert evaluate_image(np.zeros_like(gt), gt, 1)["classes"][0]["error"] == "fn"
    assert evaluate_image(gt, np.zeros_like(gt), 1)["classes"][0]["error"] == "fp"
    tn = evaluate_image(np.zeros_like(gt), np.zeros_like(gt), 1)["classes"][0]
    assert tn["error"] == "tn" and tn["dice"] == 1.0
    with pytest.raises(ValueError, match="differ in size"):
        evaluate_image(gt[:10], gt, 1)


def test_patients_sum_their_slices_and_sort_worst_first() -> None:
    gt, half = _square(20, 0, 0, 10).astype(np.uint8), _square(20, 0, 0, 5).astype(np.uint8)
    images = [
        {"patient": "A", **evaluate_image(gt, gt, 1)},
        {"patient": "A", **evaluate_image(np.zeros_like(gt), np.zeros_like(gt), 1)},
        {"patient": "B", **evaluate_image(half, gt, 1)},
        {"patient": "B", **evaluate_image(np.zeros_like(gt), gt, 1)},
    ]
    rows = patient_rows(images, ["lesion"])
    assert [r["patient"] for r in rows] == ["B", "A"]
    b = rows[0]
    assert b["gt_pixels"] == 200 and b["pred_pixels"] == 25
    assert b["dice"] == pytest.approx(2 * 25 / (25 + 200))
    assert b["detection"] == "tp" and b["slice_errors"]["fn"] == 1
    assert rows[1]["dice"] == 1.0 and rows[1]["slice_errors"] == {
        "fn": 0,
        "fp": 0,
        "tp": 1,
        "tn": 1,
    }


def test_roc_auroc_equals_the_rank_statistic() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(60), 1)  # ties on purpose
    labels = rng.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    pairs = list(itertools.product(pos, neg))
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    roc = roc_curve(scores.tolist(), labels.tolist())
    assert roc["auroc"] == pytest.approx(expected)
    assert roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0 and roc["fpr"][-1] == 1.0
    assert np.isnan(roc_curve([0.1, 0.2], [True, True])["auroc"])


def _html_case_rows(page: str) -> list[str]:
    return re.findall(r'<tr class="case"[^>]*data-part="test"', page)


def check_report_html_in_chromium(page: Path, expected_cases: int) -> None:
    """Load the page in headless Chromium: no console error, the expected number of cases shown."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")
    proc = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    dom = proc.stdout
    shown = re.search(r'<span id="shown">(\d+)</span>', dom)
    total = re.search(r'<span id="total">(\d+)</span>', dom)
    assert shown and total and shown.group(1) == total.group(1)
    assert len(_html_case_rows(dom)) == expected_cases


def test_report_html_is_self_contained_and_lists_every_test_case(tmp_path: Path) -> None:
    from camseg.data.folder import load_index
    from camseg.report_html import write_html_report
    from camseg.seg.cases import evaluate_predictions

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    rows = ["image,mask,group,lesion"]
    for i in range(5):
        img = (np.arange(32 * 32).reshape(32, 32) % 255).astype(np.uint8)
        gt = (
            _square(32, 4 + i, 4, 8).astype(np.uint8)
            if i % 2 == 0
            else np.zeros((32, 32), np.uint8)
        )
        Image.fromarray(img).save(root / "images" / f"s{i}.png")
        Image.fromarray(gt).save(root / "masks" / f"s{i}.png")
        Image.fromarray(_square(32, 4, 4, 8).astype(np.uint8)).save(pred_dir / f"s{i}.png")
        rows.append(f"images/s{i}.png,masks/s{i}.png,P{i % 2},{int(gt.any())}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    index = load_index(root)
    cases = evaluate_predictions(pred_dir, index, index.samples)
    assert cases["num_images"] == 5
    dices = [im["classes"][0]["dice"] for im in cases["images"]]
    assert dices == sorted(dices)
    fp = [im for im in cases["images"] if im["classes"][0]["error"] == "fp"]
    assert len(fp) == 2  # normal slices with a prediction are listed, not hidden
    page = write_html_report(tmp_path / "report.html", "t", root, index.classes, cases, pred_dir)
    text = page.read_text()
    assert len(_html_case_rows(text)) == 5
    assert "http://" not in text and "https://" not in text  # nothing fetched from anywhere
    assert 'data-error="fp"' in text and 'data-patient="P1"' in text


@pytest.mark.slow
def test_report_html_loads_in_headless_chromium(tmp_path: Path) -> None:
    test_report_html_is_self_contained_and_lists_every_test_case(tmp_path)
    check_report_html_in_chromium(tmp_path / "report.html", 5)


def test_pictures_are_spread_over_the_patients_lesions_first() -> None:
    from types import SimpleNamespace

    from camseg.seg.cases import spread_over_patients

    samples = [
        SimpleNamespace(id=f"{p}_{k}", group=p, labels=(int(k == 2),))
        for p in ("A", "B", "C")
        for k in range(4)
    ]
    picked = spread_over_patients(samples, 5)
    assert picked == ["A_2", "B_2", "C_2", "A_0", "B_0"]
    assert len(spread_over_patients(samples, 50)) == 12  # never more than there are
    assert spread_over_patients([], 3) == []


def test_report_html_carries_the_audit_headline(tmp_path: Path) -> None:
    """The audit's figures, its shortcut warning (escaped) and its focus image, inlined."""
    import base64

    from camseg.audit.report import html_section
    from camseg.report_html import write_html_report

    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    png = _square(16, 2, 2, 4).astype(np.uint8) * 255
    Image.fromarray(png).save(audit_dir / "focus_cam.png")
    doc = {
        "dataset": {"images": 12, "split": "val"},
        "headline": {
            "method": "cam",
            "energy_pointing": 0.25,
            "pointing_game": 0.5,
            "out_of_body_share": 0.75,
            "shortcut": True,
            "shortcut_reasons": ["83% of the maps peak in the top-left corner <marker>"],
        },
        "focus": {"cam": {"image": "focus_cam.png"}},
    }
    block = html_section(doc, audit_dir)
    assert "energy inside the lesion 25%" in block and "pointing game 50%" in block
    assert "energy outside the body 75%" in block
    assert "top-left corner &lt;marker&gt;" in block and "<marker>" not in block
    inlined = base64.b64encode((audit_dir / "focus_cam.png").read_bytes()).decode("ascii")
    assert f"data:image/png;base64,{inlined}" in block
    page = write_html_report(
        tmp_path / "report.html", "t", tmp_path, ["lesion"], None, None, preface=block
    ).read_text()
    assert "Warning: the classifier may rest on a shortcut" in page
    assert html_section(None, audit_dir) == ""
    calm = {**doc, "headline": {**doc["headline"], "shortcut": False, "shortcut_reasons": []}}
    assert "No shortcut flagged" in html_section(calm, audit_dir)
