"""``camseg-audit CKPT DATA_ROOT --out DIR [key=value ...]``: audit any classifier checkpoint.

The config is camseg's own (``conf/config.yaml``) with ``data=default`` on ``DATA_ROOT``;
further Hydra overrides set the rest, e.g. ``data.image_size=256 audit.methods=[cam,gradcam]
audit.split=test``. Writes ``DIR/audit.json`` and the outcome-focus pictures, prints the
headline, and exits 2 with one line on a bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from camseg.errors import CamsegError


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="camseg-audit",
        description="Audit a stage-1 classifier's CAMs on a dataset in the camseg folder format.",
    )
    p.add_argument(
        "checkpoint", type=Path, help="a camseg classifier checkpoint (cls/checkpoints/best.ckpt)"
    )
    p.add_argument("data_root", type=Path, help="dataset root with labels.csv")
    p.add_argument(
        "--out", type=Path, required=True, help="output folder (audit.json, focus_*.png)"
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.image_size=256")
    return p.parse_intermixed_args(argv)


def run(argv: list[str]) -> int:
    args = parse(argv)
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from camseg.app import _initialize, conf_dir
    from camseg.audit.stage import AUDIT_JSON, audit_dataset, headline_text
    from camseg.cls.checkpoint import check_compatible
    from camseg.stage_common import build_datamodule
    from camseg.utils.io import write_json_atomic

    if not args.checkpoint.is_file():
        raise CamsegError(f"{args.checkpoint}: checkpoint not found")
    if not (args.data_root / "labels.csv").is_file():
        raise CamsegError(
            f"{args.data_root}: no labels.csv; give a dataset root in the camseg folder format"
        )
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise CamsegError(f"{bad[0]!r}: overrides are key=value, e.g. data.image_size=256")
    try:
        with _initialize(conf_dir()):
            cfg = compose(
                "config",
                overrides=["data=default", f"data.root={args.data_root}", *args.overrides],
            )
    except (HydraException, OmegaConfBaseException) as e:
        raise CamsegError(str(e).strip().splitlines()[0]) from None
    dm = build_datamodule(cfg)
    dm.setup("predict")
    check_compatible(args.checkpoint, dm.classes)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = audit_dataset(cfg, args.checkpoint, dm, args.out)
    doc["classifier"]["checkpoint"] = str(args.checkpoint.resolve())
    write_json_atomic(args.out / AUDIT_JSON, doc)
    print(f"camseg-audit: {headline_text(doc)}")
    print(f"camseg-audit: wrote {args.out / AUDIT_JSON}")
    return 0


def main(argv: list[str] | None = None) -> None:
    try:
        sys.exit(run(sys.argv[1:] if argv is None else argv))
    except CamsegError as e:
        print(f"camseg-audit: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
