"""``camseg-cam``: the class activation maps of one image from a stage-1 checkpoint.

    camseg-cam --ckpt runs/synthetic/cls/checkpoints/best.ckpt --image data/.../images/P000_003.png
        [--method cam|gradcam|gradcampp|layercam|scorecam] [--target-layer LAYER]
        [--scales 1.0 0.5 1.5 2.0] [--no-flip] [--out cam.png]

Writes one PNG: the image, then a heatmap overlay per class, and prints each class
probability. The method names are those of ``cam.method`` (the ``conf/cam`` group), read
from the CAM registry; ``gradcam++`` is accepted for ``gradcampp``. The image is
preprocessed exactly as the classifier was trained (size, channels, normalisation: the
record its checkpoint stores). A checkpoint from before the record falls back to its run's
``cls/config.yaml``, else to 128 px, mean 0.5, std 0.25, with a warning naming the values.
A 2.5D classifier refuses a 2D image. Errors are one line, exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from camseg.errors import CamsegError

log = logging.getLogger(__name__)

# A config group name is a plain identifier (``gradcampp``); ``gradcam++`` is an alias.
_GROUP_NAME = re.compile(r"^\w+$")


def method_names() -> dict[str, str]:
    """Every accepted ``--method`` -> the ``cam.method`` name it stands for (the registry's)."""
    from camseg.cam.factory import CAM_METHODS

    canonical: dict[type, str] = {}
    for cls in dict.fromkeys(CAM_METHODS.values()):
        names = (cls.name, *cls.aliases)
        canonical[cls] = next((n for n in names if _GROUP_NAME.match(n)), cls.name)
    return {alias: canonical[cls] for alias, cls in CAM_METHODS.items()}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog: str) -> argparse.ArgumentParser:
    names = sorted(set(method_names().values()))
    ap = _Parser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ckpt", type=Path, required=True, help="stage-1 classifier checkpoint")
    ap.add_argument("--image", type=Path, required=True, help="a 2D image (PNG, JPEG, TIFF)")
    ap.add_argument("--method", default="cam", help=f"one of {', '.join(names)} (default cam)")
    ap.add_argument("--target-layer", default=None, help="module name; default: the last stage")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5, 1.5, 2.0])
    ap.add_argument("--no-flip", action="store_true", help="no horizontally flipped view")
    ap.add_argument("--out", type=Path, default=Path("cam_overlay.png"))
    return ap


def run_config_data(ckpt: Path) -> dict[str, Any] | None:
    """The ``data`` section of the run's ``cls/config.yaml`` beside ``checkpoints/``, if any."""
    import yaml

    path = ckpt.parent.parent / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = (yaml.safe_load(path.read_text()) or {}).get("data")
    except (yaml.YAMLError, AttributeError, OSError):
        return None
    if not isinstance(data, dict):
        return None
    keys = ("image_size", "in_channels", "context_slices", "mean", "std")
    return {k: data[k] for k in keys if k in data}


def main(argv: Sequence[str] | None = None, prog: str = "camseg-cam") -> None:
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    for flag, path in (("--ckpt", args.ckpt), ("--image", args.image)):
        if not path.is_file():
            ap.error(f"{flag} {path}: no such file")
    if any(s <= 0 for s in args.scales):
        ap.error(f"--scales {args.scales}: every scale must be > 0")
    methods = method_names()
    method = methods.get(args.method.lower())
    if method is None:
        ap.error(f"--method {args.method}: unknown; use one of {sorted(set(methods.values()))}")

    import torch

    from camseg.cam import build_cam_method
    from camseg.cam.factory import CAM_METHODS
    from camseg.cam.layers import default_target_layer
    from camseg.cls.checkpoint import load_classifier
    from camseg.data.preprocess import from_hparams
    from camseg.utils.io import read_image, save_png_atomic
    from camseg.utils.overlay import cam_overlay, panel, to_rgb

    label = f"--ckpt {args.ckpt}"
    # weights_only=True and camseg's own model class: the checkpoint never runs code.
    model, hp = load_classifier(args.ckpt, label=label)
    record = from_hparams(hp, label, legacy=run_config_data(args.ckpt))
    if record.in_channels != model.in_channels:
        raise CamsegError(
            f"{label}: preprocess.in_channels={record.in_channels} but the network takes "
            f"{model.in_channels}"
        )
    raw = read_image(args.image)
    planes = record.image_planes(raw, f"--image {args.image}")
    t = torch.from_numpy(record.to_input([planes]))
    kwargs: dict[str, Any] = {}
    if CAM_METHODS[method].takes_target_layer:
        kwargs["target_layer"] = args.target_layer or default_target_layer(model)
    elif args.target_layer:
        ap.error(f"--target-layer: {method} takes no target layer (it reads the classifier head)")
    engine = build_cam_method(method, model, scales=args.scales, flip=not args.no_flip, **kwargs)
    with torch.no_grad():
        logits = model(t)
    probs = torch.sigmoid(logits) if hp.get("multilabel", True) else logits.softmax(1)
    k = model.num_classes
    maps = torch.nn.functional.interpolate(
        engine(t, torch.ones(1, k)).float(),
        size=raw.shape[:2],
        mode="bilinear",
        align_corners=False,
    )
    cams = maps[0].numpy()
    names = list(record.class_names) or [f"class {i}" for i in range(k)]
    tiles = [to_rgb(raw)] + [cam_overlay(raw, cams[i]) for i in range(k)]
    scores = probs[0].tolist()
    titles = ["image"] + [f"{n} p={p:.2f}" for n, p in zip(names, scores, strict=True)]
    save_png_atomic(args.out, panel(*tiles, titles=titles))
    for name, p in zip(names, scores, strict=True):
        print(f"{name}: p={p:.3f}")
    print(f"wrote {args.out} (image, then one CAM per class: {', '.join(names)})")


def cli(prog: str = "camseg-cam") -> None:
    """The installed command: a camseg error (bad checkpoint, method, layer) is one line, exit 2."""
    try:
        main(prog=prog)
    except CamsegError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
