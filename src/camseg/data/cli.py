"""``camseg-data``: check a dataset root, generate the synthetic dataset, convert public datasets.

camseg-data check ROOT
camseg-data synth --out DIR --flavor hemorrhage --patients 40 --slices-per-patient 16 --size 128 --seed 0
camseg-data synth --out DIR --preset realistic-hemorrhage   (512 px head CT, 3 CT windows, ~12 % positive)
camseg-data ct-ich SRC --out DST      (also: lidc, folder, lgg-mri; see --help of each)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from camseg.data.synthetic_presets import PRESETS
from camseg.errors import CamsegError


def _check(args: argparse.Namespace) -> int:
    from camseg.data.folder import load_index, summarize, validate_root
    from camseg.errors import DatasetProblems

    classes = args.classes.split(",") if args.classes else None
    try:
        index = (
            load_index(args.root, classes=classes)
            if args.quick
            else validate_root(args.root, classes=classes)
        )
    except DatasetProblems as e:
        if e.total == 1:
            raise
        # Every problem on its own line, so all can be fixed in one go.
        for problem in e.problems:
            print(f"camseg-data: error: {problem}", file=sys.stderr)
        if e.total > len(e.problems):
            print(f"camseg-data: error: ... and {e.total - len(e.problems)} more", file=sys.stderr)
        print(f"camseg-data: {args.root}: {e.total} problems", file=sys.stderr)
        return 2
    summary = summarize(index)
    preview = split_preview(index, args.val_fraction, args.test_fraction, args.split_seed)
    if args.json:
        print(json.dumps({**summary, "split_preview": preview}, indent=2))
        return 0
    print(f"{summary['root']}: OK")
    print(f"  samples       {summary['samples']} ({summary['negatives']} negatives)")
    print(f"  classes       {', '.join(summary['classes'])}")
    for c, n in summary["positives"].items():
        print(f"  positives     {c}: {n}")
    print(f"  groups        {summary['groups']} (patients)")
    print(f"  masks         {summary['masks']} of {summary['samples']}")
    print(f"  splits        {summary['splits']}")
    print(f"  image sizes   {summary['image_sizes']}")
    print(
        f"  patient split the pipeline would make (data.val_fraction={args.val_fraction}, "
        f"data.test_fraction={args.test_fraction}, data.split_seed={args.split_seed}):"
    )
    for name, part in preview["splits"].items():
        pos = ", ".join(f"{c} {n}" for c, n in part["positives"].items())
        print(
            f"    {name:<5} {part['patients']:>4} patients {part['images']:>6} images  "
            f"positives: {pos}  masks {part['masks']}"
        )
    for warning in preview["warnings"]:
        print(f"camseg-data: warning: {warning}", file=sys.stderr)
    return 0


def split_preview(
    index: Any, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, Any]:
    """The train/val/test split by patient that the DataModule makes with these settings,
    and a warning for each split that has no positive image of a class (its metrics would be
    undefined) or, for val/test, no mask (nothing to evaluate the segmenter on)."""
    from camseg.data.splits import assign_splits

    splits = assign_splits(index.samples, val_fraction, test_fraction, seed)
    out: dict[str, Any] = {"splits": {}, "warnings": []}
    for name, samples in splits.items():
        positives = {c: sum(s.labels[k] for s in samples) for k, c in enumerate(index.classes)}
        part = {
            "patients": len({s.group for s in samples}),
            "images": len(samples),
            "positives": positives,
            "masks": sum(s.mask is not None for s in samples),
        }
        out["splits"][name] = part
        fraction = {"train": 1.0, "val": val_fraction, "test": test_fraction}[name]
        if fraction == 0:
            continue
        for c, n in positives.items():
            if n == 0:
                out["warnings"].append(
                    f"the {name} split has no positive '{c}' image ({part['patients']} patients): "
                    f"its {c} metrics will be undefined; add patients with '{c}' or raise "
                    f"data.{name}_fraction"
                    if name != "train"
                    else f"the train split has no positive '{c}' image: the classifier cannot learn it"
                )
        if name != "train" and part["images"] and not part["masks"]:
            out["warnings"].append(
                f"the {name} split has no mask: the segmenter cannot be evaluated on it"
            )
    return out


def _synth(args: argparse.Namespace) -> int:
    from camseg.data.synthetic import generate
    from camseg.data.synthetic_presets import get_preset

    # A preset renders one flavor; --flavor defaults to it, and naming another is an error.
    flavor = args.flavor or (get_preset(args.preset).flavor if args.preset else "hemorrhage")
    out = generate(
        args.out,
        flavor=flavor,
        patients=args.patients,
        slices_per_patient=args.slices_per_patient,
        size=args.size,
        seed=args.seed,
        shortcut_marker_prob=args.shortcut_marker_prob,
        lesion_prob=args.lesion_prob,
        overwrite=args.overwrite,
        preset=args.preset,
    )
    print(f"synthetic {args.preset or flavor} dataset written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="camseg-data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="validate a dataset root and print a summary")
    p.add_argument("root", type=Path)
    p.add_argument(
        "--classes", help="comma-separated class columns (default: all non-reserved columns)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="check labels.csv and file presence only, do not decode images",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--val-fraction", type=float, default=0.15, help="as data.val_fraction")
    p.add_argument("--test-fraction", type=float, default=0.15, help="as data.test_fraction")
    p.add_argument("--split-seed", type=int, default=0, help="as data.split_seed")
    p.set_defaults(func=_check)

    p = sub.add_parser(
        "synth", help="generate the synthetic CT dataset (deterministic from --seed)"
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="realistic-hemorrhage: HU head CT as 3 CT windows (RGB), 512 px, 24 slices, "
        "~12%% positive slices, lesions 0.1-3%% of the slice; explicit flags override it",
    )
    p.add_argument("--flavor", choices=("hemorrhage", "nodule"), default=None)
    # None: the preset's value, or the plain generator's default (40, 16, 128, 0.5).
    p.add_argument("--patients", type=int, default=None, help="default 40")
    p.add_argument("--slices-per-patient", type=int, default=None, help="default 16 (preset: 24)")
    p.add_argument("--size", type=int, default=None, help="default 128 (preset: 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--shortcut-marker-prob",
        type=float,
        default=0.0,
        help="label-correlated corner marker (a shortcut for CAMs to expose)",
    )
    p.add_argument(
        "--lesion-prob",
        type=float,
        default=None,
        help="fraction of slices with a lesion (default 0.5; preset: 0.12)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_synth)

    from camseg.data.prepare import register

    register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CamsegError as e:
        print(f"camseg-data: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
