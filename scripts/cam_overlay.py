"""Show the CAMs of one image from a stage-1 checkpoint.

    python scripts/cam_overlay.py --ckpt runs/synthetic/cls/checkpoints/best.ckpt --image data/.../images/P000_003.png \
        [--method cam|gradcam|gradcam++|layercam|scorecam] [--scales 1.0 0.5 1.5 2.0] [--no-flip] [--out cam.png]

Writes one PNG: the image, then a heatmap overlay per class with the class probability in the
file's printed summary. The preprocessing (size, channels, normalisation) is the checkpoint's run
config (``cls/config.yaml`` beside ``checkpoints/``) when present.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from camseg.cam import build_cam_method
from camseg.cam.layers import default_target_layer
from camseg.cls.checkpoint import load_classifier
from camseg.data.datamodule import to_channels
from camseg.errors import CamsegError
from camseg.utils.io import read_image, save_png_atomic
from camseg.utils.overlay import cam_overlay, panel, to_rgb


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--method", default="cam")
    ap.add_argument("--target-layer", default=None)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5, 1.5, 2.0])
    ap.add_argument("--no-flip", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("cam_overlay.png"))
    args = ap.parse_args()
    for flag, path in (("--ckpt", args.ckpt), ("--image", args.image)):
        if not path.is_file():
            ap.error(f"{flag} {path}: no such file")
    if any(s <= 0 for s in args.scales):
        ap.error(f"--scales {args.scales}: every scale must be > 0")

    # weights_only=True and camseg's own model class: the checkpoint never runs code.
    model, hp = load_classifier(args.ckpt, label=f"--ckpt {args.ckpt}")
    size, mean, std = 128, [0.5], [0.25]
    run_cfg = args.ckpt.parent.parent / "config.yaml"
    if run_cfg.is_file():
        data = yaml.safe_load(run_cfg.read_text())["data"]
        size, mean, std = int(data["image_size"]), data["mean"], data["std"]
    in_ch = int(hp["net_config"]["in_channels"])
    raw = read_image(args.image)
    img = to_channels(raw, in_ch)
    import cv2

    x = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    x = x[..., None] if x.ndim == 2 else x
    m = np.broadcast_to(np.asarray(mean, np.float32).reshape(-1), (in_ch,)) * 255
    s = np.broadcast_to(np.asarray(std, np.float32).reshape(-1), (in_ch,)) * 255
    t = torch.from_numpy(((x - m) / s).transpose(2, 0, 1).copy())[None]
    k = model.num_classes
    kwargs = {}
    if args.method != "cam":
        kwargs["target_layer"] = args.target_layer or default_target_layer(model)
    engine = build_cam_method(
        args.method, model, scales=args.scales, flip=not args.no_flip, **kwargs
    )
    with torch.no_grad():
        logits = model(t)
    probs = torch.sigmoid(logits) if hp.get("multilabel", True) else logits.softmax(1)
    cams = engine(t, torch.ones(1, k)).float()
    cams = torch.nn.functional.interpolate(
        cams, size=raw.shape[:2], mode="bilinear", align_corners=False
    )[0].numpy()
    tiles = [to_rgb(raw)] + [cam_overlay(raw, cams[i]) for i in range(k)]
    titles = ["image"] + [
        f"{name} p={p:.2f}" for name, p in zip(hp["class_names"], probs[0].tolist(), strict=True)
    ]
    save_png_atomic(args.out, panel(*tiles, titles=titles))
    for name, p in zip(hp["class_names"], probs[0].tolist(), strict=True):
        print(f"{name}: p={p:.3f}")
    print(f"wrote {args.out} (image, then one CAM per class: {', '.join(hp['class_names'])})")


if __name__ == "__main__":
    try:
        main()
    except CamsegError as e:  # bad checkpoint, method or layer: one line, exit 2
        print(f"cam_overlay.py: error: {e}", file=sys.stderr)
        sys.exit(2)
