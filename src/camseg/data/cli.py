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
    if args.json:
        print(json.dumps(summary, indent=2))
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
    return 0


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
