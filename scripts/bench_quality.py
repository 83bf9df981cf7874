"""Quality benchmark: run the pipeline and print one table row per run.

    python scripts/bench_quality.py                                   # the default synthetic experiment
    python scripts/bench_quality.py --experiment lgg_mri --tag "baseline" -- cam=layercam pseudo.crf=...
    python scripts/bench_quality.py --results runs/ablation.csv --only-table

Each run appends a row to --results (CSV) and the whole table is printed (markdown): classifier
test AUROC, pseudo-mask Dice at the configured and at the best sweep threshold, segmenter test
Dice/IoU against ground truth, and the wall time of each stage. Finished stages of a run_name are
reused (pass force=true to redo them).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from camseg.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[1]
COLUMNS = [
    "tag",
    "experiment",
    "cls_test_auroc",
    "pseudo_dice",
    "pseudo_best_dice",
    "pseudo_best_threshold",
    "seg_test_dice",
    "seg_test_iou",
    "seg_patient_dice",
    "cls_s",
    "pseudo_s",
    "seg_s",
    "total_s",
    "machine",
    "overrides",
]


def machine() -> str:
    dev = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU x{torch.get_num_threads()} threads"
    )
    return f"{platform.machine()} {dev}"


def run_one(experiment: str, tag: str, overrides: list[str]) -> dict[str, object]:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}", *overrides])
    t0 = time.time()
    run_pipeline(cfg)
    total = time.time() - t0
    run = Path(cfg.paths.runs_dir) / str(cfg.run_name)
    cls_m = json.loads((run / "cls/metrics.json").read_text())
    q = (
        json.loads((run / "pseudo/quality.json").read_text())
        if (run / "pseudo/quality.json").is_file()
        else {}
    )
    seg_m = json.loads((run / "seg/metrics.json").read_text())
    timings = json.loads((run / "timings.json").read_text())
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    return {
        "tag": tag,
        "experiment": experiment,
        "cls_test_auroc": fmt(cls_m["test"].get("test/auroc")),
        "pseudo_dice": fmt(q.get("dice")),
        "pseudo_best_dice": fmt(q.get("sweep", {}).get("best_dice")),
        "pseudo_best_threshold": q.get("sweep", {}).get("best_threshold", ""),
        "seg_test_dice": fmt(seg_m["test"].get("test/dice")),
        "seg_test_iou": fmt(seg_m["test"].get("test/iou")),
        "seg_patient_dice": fmt(seg_m["test"].get("test/dice_patient_mean")),
        "cls_s": timings.get("cls", ""),
        "pseudo_s": timings.get("pseudo", ""),
        "seg_s": timings.get("seg", ""),
        "total_s": round(total, 1),
        "machine": machine(),
        "overrides": " ".join(overrides),
    }


def print_table(rows: list[dict[str, str]]) -> None:
    cols = [c for c in COLUMNS if c not in ("machine",)]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    machines = sorted({r.get("machine", "") for r in rows})
    print(f"\nmachine(s): {', '.join(machines)}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--experiment", default="synthetic")
    ap.add_argument("--tag", default="default")
    ap.add_argument("--results", type=Path, default=Path("runs/bench_quality.csv"))
    ap.add_argument("--only-table", action="store_true")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides after --")
    args = ap.parse_args()
    rows: list[dict[str, str]] = []
    if args.results.is_file():
        with open(args.results, newline="") as f:
            rows = list(csv.DictReader(f))
    if not args.only_table:
        row = run_one(args.experiment, args.tag, args.overrides)
        rows.append({k: str(v) for k, v in row.items()})
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with open(args.results, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
    print_table(rows)


if __name__ == "__main__":
    main()
