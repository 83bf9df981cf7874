"""``camseg-predict``: a trained segmenter on new, unlabelled images, CT volumes and DICOM series.

    camseg-predict ckpt=runs/synthetic/seg/checkpoints/best.ckpt input=DIR_OR_FILE output=DIR
        [device=auto] [batch_size=16] [overlays=true] [windows=lung]
        [max_image_pixels=16777216]

Every argument is also accepted as ``--key value`` (``--batch-size`` for ``batch_size``).

The checkpoint's preprocessing record is applied as stored: input size, channels,
normalisation, 2.5D context and, for NIfTI and DICOM input, the CT windows the model was
trained on. ``windows=`` is accepted only for a checkpoint that records none; a 2.5D
model refuses 2D images (they have no neighbouring slices).

Images above max_image_pixels (default 4096x4096) are segmented at a bounded working size
and their masks resized to the image's size (nearest neighbour); a warning says so once.

Exit status: 0 when every input was segmented; 1 when some inputs could not be read
(the others are still segmented and written; the skipped ones are listed at the end,
one line each with the reason); 2 for a usage error (one line, nothing is written).

2D images (PNG, JPEG, TIFF) give ``output/masks/<name>.png`` (class indices) and
``output/overlays/<name>.png``. NIfTI volumes (``.nii``, ``.nii.gz``) and DICOM series (a
folder holding one series) are segmented slice by slice along the axial axis and give
``output/<name>_mask.nii.gz`` in the input's space, and one row per volume and class in
``output/volumes.csv``: voxels and lesion volume in mL from the voxel spacing.
"""

from __future__ import annotations

import csv
import io
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from camseg.data.preprocess import (
    RECORD_KEY,
    PreprocessError,
    Preprocessing,
    describe_windows,
    from_hparams,
)
from camseg.errors import CamsegError
from camseg.predict_inputs import (
    check_output,
    check_output_collisions,
    is_volume,
    list_inputs,
    output_name,
    output_path,
    parse_args,
    parse_batch_size,
    parse_device,
    parse_max_image_pixels,
    parse_windows_arg,
)
from camseg.predict_volumes import (
    VOLUME_COLUMNS,
    read_dicom,
    read_nifti,
    volume_rows,
)
from camseg.utils.io import read_image, save_png_atomic, write_bytes_atomic, write_text_atomic
from camseg.utils.large import (
    DEFAULT_MAX_IMAGE_PIXELS,
    OVERLAY_MAX_PIXELS,
    resize_area,
    resize_nearest,
    warn_large,
    working_size,
)

# torch, Lightning, smp, cv2 and matplotlib are imported where they are used, so that --help and
# argument errors answer at once (importing them takes seconds).
if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

VOLUMES_CSV = "volumes.csv"


@dataclass
class Segmenter:
    """A stage-3 network with the preprocessing record it was trained with."""

    net: torch.nn.Module
    preprocess: Preprocessing
    device: torch.device
    # Above this many pixels, logits are resized to a bounded working size, not the image's.
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", windows: str | None = None) -> Segmenter:
        """The checkpoint's network and record; ``windows`` only where it records none."""
        path = Path(path)
        if not path.is_file():
            raise CamsegError(
                f"ckpt={path}: file not found; give a stage-3 checkpoint such as runs/<run>/seg/checkpoints/best.ckpt"
            )
        import torch

        from camseg.checkpoints import (
            SEGMENTER,
            load_weights,
            read_checkpoint,
            segmenter_data_config,
            state_dict,
        )
        from camseg.models.segmenter import build_segmenter

        label = f"ckpt={path}"
        # weights_only=True, and the network from camseg's whitelist: the file never runs code.
        ckpt = read_checkpoint(path, SEGMENTER, label)
        hp = ckpt["hyper_parameters"]
        net = build_segmenter(hp["net_config"], label)
        load_weights(net, state_dict(ckpt, label), label)
        segmenter_data_config(hp, label)  # the stored types, checked
        recorded = RECORD_KEY in hp
        record = from_hparams(hp, label, warn=log.warning if windows is None else lambda m: None)
        if windows is not None:
            record = with_windows(record, windows, recorded, label)
        if int(hp["net_config"]["in_channels"]) != record.in_channels:
            raise CamsegError(
                f"{label}: {RECORD_KEY}.in_channels={record.in_channels} but the network takes "
                f"{hp['net_config']['in_channels']}"
            )
        dev = torch.device(
            "cuda"
            if device == "auto" and torch.cuda.is_available()
            else ("cpu" if device == "auto" else device)
        )
        net.to(dev).eval()
        return cls(net, record, dev)

    @property
    def class_names(self) -> list[str]:
        return list(self.preprocess.class_names)

    @property
    def context_slices(self) -> int:
        return self.preprocess.context_slices

    @property
    def base_channels(self) -> int:
        return self.preprocess.channels

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 (H,W,in_channels) images -> uint8 class-index masks at each image's size."""
        import torch
        import torch.nn.functional as F

        x = self.preprocess.to_input(images)
        with torch.no_grad():
            t = torch.from_numpy(x).to(self.device)
            logits = self.net(t).float()
            out = []
            for i, im in enumerate(images):
                h, w = im.shape[:2]
                size = working_size(h, w, self.max_image_pixels)
                lg = F.interpolate(
                    logits[i : i + 1], size=size, mode="bilinear", align_corners=False
                )
                mask = lg.argmax(1)[0].to(torch.uint8).cpu().numpy()
                out.append(resize_nearest(mask, h, w))
        return out


def with_windows(record: Preprocessing, spec: str, recorded: bool, label: str) -> Preprocessing:
    """``windows=`` on the command line: allowed where the checkpoint records none (or
    predates the record), refused where it contradicts the recorded windows."""
    wins = parse_windows_arg(spec)
    if recorded and record.windows:
        if wins == record.windows or [(w.center, w.width) for w in wins] == [
            (w.center, w.width) for w in record.windows
        ]:
            return record
        raise CamsegError(
            f"windows={spec}: {label} was trained on the CT windows "
            f"{describe_windows(record.windows)}; drop windows= to apply them"
        )
    if len(wins) != record.channels:
        raise CamsegError(
            f"windows={spec}: {len(wins)} window(s) but the model takes {record.channels} "
            "channel(s) per slice"
        )
    return replace(record, windows=wins)


def _batches(xs: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(xs), n):
        yield xs[i : i + n]


def predict_images(
    model: Segmenter, files: list[Path], root: Path, out: Path, batch_size: int, overlays: bool
) -> list[tuple[Path, str]]:
    """Predict and write every readable image; return ``(file, reason)`` for the others.

    One unreadable file must not cost the valid ones after it: it is set aside with its
    reason and the batch goes on without it.
    """
    from camseg.utils.overlay import draw_contours, panel, to_rgb

    failed: list[tuple[Path, str]] = []
    for chunk in tqdm(list(_batches(files, batch_size)), desc="images", unit="batch"):
        ok: list[Path] = []
        raws: list[np.ndarray] = []
        imgs: list[np.ndarray] = []
        for f in chunk:
            try:
                raw = read_image(f)
            except Exception as e:  # PIL raises many types for a damaged file
                failed.append((f, f"cannot read image ({_reason(e)})"))
                continue
            try:
                imgs.append(model.preprocess.image_planes(raw, str(f)))
            except PreprocessError as e:  # e.g. a 2-channel model and a grey image
                failed.append((f, str(e).removeprefix(f"{f}: ")))
                continue
            ok.append(f)
            raws.append(raw)
        if not imgs:
            continue
        for f, raw, mask in zip(ok, raws, model.predict(imgs), strict=True):
            name = output_name(f, root)
            save_png_atomic(out / "masks" / f"{name}.png", mask)
            h, w = raw.shape[:2]
            warn_large("camseg-predict", str(f), h, w, model.max_image_pixels, "max_image_pixels")
            if overlays:
                # Drawn at a bounded size: a large image's overlay is a picture to look at.
                h, w = working_size(raw.shape[0], raw.shape[1], OVERLAY_MAX_PIXELS)
                rgb = to_rgb(resize_area(raw, h, w))
                mask = resize_nearest(mask, h, w)
                save_png_atomic(
                    out / "overlays" / f"{name}.png",
                    panel(rgb, draw_contours(rgb, mask), titles=("image", "prediction")),
                )
    return failed


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def predict_volume(
    model: Segmenter, f: Path, root: Path, out: Path, batch_size: int
) -> list[list[object]]:
    """Segment a NIfTI volume or a DICOM series slice by slice through the recorded windows
    and context; write ``<name>_mask.nii.gz``; return its ``volumes.csv`` rows."""
    vol = read_dicom(f) if f.is_dir() else read_nifti(f)
    try:
        inputs = model.preprocess.volume_inputs(vol.slices_hu)
    except PreprocessError as e:
        raise CamsegError(f"{f}: {e}") from None
    masks: list[np.ndarray] = []
    for chunk in _batches(inputs, batch_size):
        masks += model.predict(chunk)
    dest = output_path(f, root, out)
    write_bytes_atomic(dest, vol.to_nifti(masks))
    labels = np.stack(masks)
    return volume_rows(
        str(f), dest.relative_to(out).as_posix(), labels, model.class_names, vol.voxel_mm3
    )


def run(argv: list[str]) -> int:
    """Predict every input; 0 when all succeeded, 1 when some inputs were skipped (listed)."""
    args = parse_args(argv, __doc__)
    # Every argument is checked before the checkpoint and the images are loaded.
    batch = parse_batch_size(args.get("batch_size", "16"))
    device = parse_device(args.get("device", "auto"))
    src, out = Path(args["input"]), Path(args["output"])
    check_output(out)
    max_pixels = parse_max_image_pixels(args.get("max_image_pixels"))
    windows = args.get("windows")
    if windows is not None:
        parse_windows_arg(windows)
    files = list_inputs(src)
    root = src if src.is_dir() else src.parent
    check_output_collisions(files, root, out)
    model = Segmenter.load(args["ckpt"], device, windows)
    model.max_image_pixels = max_pixels
    overlays = args.get("overlays", "true").lower() in ("1", "true", "yes")
    vols = [f for f in files if is_volume(f)]
    imgs = [f for f in files if f not in vols]
    if imgs and model.context_slices:
        more = f" and {len(imgs) - 1} more" if len(imgs) > 1 else ""
        raise CamsegError(model.preprocess.refuse_2d(f"ckpt={args['ckpt']}: {imgs[0]}{more}"))
    if vols and not model.preprocess.windows:
        raise CamsegError(f"ckpt={args['ckpt']}: {model.preprocess.refuse_volume()}")
    out.mkdir(parents=True, exist_ok=True)
    failed: list[tuple[Path, str]] = []
    if imgs:
        failed += predict_images(model, imgs, root, out, batch, overlays)
    rows: list[list[object]] = []
    for v in tqdm(vols, desc="volumes", unit="vol", disable=not vols):
        try:
            rows += predict_volume(model, v, root, out, batch)
        except CamsegError as e:
            failed.append((v, str(e).removeprefix(f"{v}: ")))
    if rows:
        write_text_atomic(out / VOLUMES_CSV, csv_text(VOLUME_COLUMNS, rows))
    bad = {f for f, _ in failed}
    done_imgs = sum(1 for f in imgs if f not in bad)
    done_vols = sum(1 for f in vols if f not in bad)
    print(f"camseg-predict: {done_imgs} image(s), {done_vols} volume(s) -> {out}")
    if failed:
        print(f"camseg-predict: {len(failed)} of {len(files)} input(s) skipped:", file=sys.stderr)
        for f, reason in failed:
            print(f"  {f}: {reason}", file=sys.stderr)
        return 1
    return 0


def csv_text(header: tuple[str, ...], rows: list[list[object]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def main() -> None:
    try:
        sys.exit(run(sys.argv[1:]))
    except CamsegError as e:
        print(f"camseg-predict: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
