"""``camseg-predict``: a trained segmenter on new, unlabelled images.

    camseg-predict ckpt=runs/synthetic/seg/checkpoints/best.ckpt input=DIR_OR_FILE output=DIR
        [device=auto] [batch_size=16] [overlays=true] [windows=brain,subdural,bone]
        [max_image_pixels=16777216]

Images above max_image_pixels (default 4096x4096) are segmented at a bounded working size
and their masks resized to the image's size (nearest neighbour); a warning says so once.

Exit status: 0 when every input was segmented; 1 when some inputs could not be read
(the others are still segmented and written; the skipped ones are listed at the end,
one line each with the reason); 2 for a usage error (one line, nothing is written).

2D images (PNG, JPEG, TIFF) give ``output/masks/<name>.png`` (class indices) and
``output/overlays/<name>.png``. NIfTI volumes (``.nii``, ``.nii.gz``) are segmented
slice by slice along the axial axis (CT windows applied to Hounsfield units) and give
``output/<name>_mask.nii.gz`` with the input's affine.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from camseg.errors import CamsegError
from camseg.optional import import_optional
from camseg.utils.io import read_image, save_png_atomic, write_bytes_atomic
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

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VOLUME_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Segmenter:
    """A stage-3 network with the preprocessing it was trained with."""

    net: torch.nn.Module
    class_names: list[str]
    image_size: int
    in_channels: int
    context_slices: int
    mean: np.ndarray
    std: np.ndarray
    device: torch.device
    # Above this many pixels, logits are resized to a bounded working size, not the image's.
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> Segmenter:
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
        d = segmenter_data_config(hp, label)
        dev = torch.device(
            "cuda"
            if device == "auto" and torch.cuda.is_available()
            else ("cpu" if device == "auto" else device)
        )
        net.to(dev).eval()
        views = 2 * int(d.get("context_slices", 0)) + 1
        base = int(d["in_channels"]) // views
        mean = (
            np.tile(np.broadcast_to(np.asarray(d["mean"], np.float32).reshape(-1), (base,)), views)
            * 255
        )
        std = (
            np.tile(np.broadcast_to(np.asarray(d["std"], np.float32).reshape(-1), (base,)), views)
            * 255
        )
        return cls(
            net,
            list(hp["class_names"]),
            int(d["image_size"]),
            int(d["in_channels"]),
            int(d.get("context_slices", 0)),
            mean,
            std,
            dev,
        )

    @property
    def base_channels(self) -> int:
        return self.in_channels // (2 * self.context_slices + 1)

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 (H,W,in_channels) images -> uint8 class-index masks at each image's size."""
        import torch
        import torch.nn.functional as F

        x = np.stack([_resize(im, self.image_size) for im in images]).astype(np.float32)
        x = (x - self.mean) / self.std
        with torch.no_grad():
            t = torch.from_numpy(x).permute(0, 3, 1, 2).to(self.device)
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


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    import cv2

    out = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    return out[..., None] if out.ndim == 2 else out


def _inputs(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and (p.suffix.lower() in IMAGE_SUFFIXES or p.name.lower().endswith(VOLUME_SUFFIXES))
        )
        if not files:
            raise CamsegError(
                f"input={path}: no images ({', '.join(IMAGE_SUFFIXES)}) or NIfTI volumes found"
            )
        return files
    raise CamsegError(f"input={path}: no such file or directory")


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
    from camseg.data.datamodule import to_channels
    from camseg.utils.overlay import draw_contours, panel, to_rgb

    failed: list[tuple[Path, str]] = []
    for chunk in tqdm(list(_batches(files, batch_size)), desc="images", unit="batch"):
        ok: list[Path] = []
        raws: list[np.ndarray] = []
        imgs: list[np.ndarray] = []
        for f in chunk:
            try:
                raw = read_image(f)
                plane = to_channels(raw, model.base_channels)
            except Exception as e:  # PIL raises many types for a damaged file
                failed.append((f, f"cannot read image ({_reason(e)})"))
                continue
            ok.append(f)
            raws.append(raw)
            # A lone 2D image has no neighbours: 2.5D models see it repeated.
            imgs.append(np.concatenate([plane] * (2 * model.context_slices + 1), axis=2))
        if not imgs:
            continue
        for f, raw, mask in zip(ok, raws, model.predict(imgs), strict=True):
            name = _name(f, root)
            save_png_atomic(out / "masks" / f"{name}.png", mask)
            h, w = working_size(raw.shape[0], raw.shape[1], model.max_image_pixels)
            if (h, w) != raw.shape[:2]:
                assert model.max_image_pixels is not None
                warn_large(
                    "camseg-predict",
                    str(f),
                    raw.shape[0],
                    raw.shape[1],
                    model.max_image_pixels,
                    "max_image_pixels",
                )
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


def _name(f: Path, root: Path) -> str:
    """The output name of input ``f``: its path relative to the input folder, without suffix.

    ``in/a/b.png`` gives ``masks/a/b.png`` (and ``in/a/v.nii.gz`` gives ``a/v_mask.nii.gz``),
    so ``a/b.png`` and ``a__b.png`` stay apart; :func:`check_output_collisions` refuses
    inputs that still share a name (``x.png`` and ``x.jpg``).
    """
    rel = f.relative_to(root) if root.is_dir() else Path(f.name)
    stem = rel.as_posix()
    for suf in (".nii.gz", *VOLUME_SUFFIXES, *IMAGE_SUFFIXES):
        if stem.lower().endswith(suf):
            stem = stem[: -len(suf)]
            break
    return stem


def output_path(f: Path, root: Path, out: Path) -> Path:
    """Where the mask predicted for input ``f`` is written (as predict_images and predict_volume spell it)."""
    if f.name.lower().endswith(VOLUME_SUFFIXES):
        return out / f"{_name(f, root)}_mask.nii.gz"
    return out / "masks" / f"{_name(f, root)}.png"


def check_output_collisions(files: list[Path], root: Path, out: Path) -> None:
    """Refuse inputs that would write the same output file, before anything is predicted.

    Names are compared case-insensitively: on macOS and Windows ``X.png`` and ``x.png``
    are one file.
    """
    seen: dict[str, Path] = {}
    clashes: list[tuple[Path, Path, Path]] = []
    for f in files:
        dest = output_path(f, root, out)
        first = seen.setdefault(dest.as_posix().casefold(), f)
        if first != f:
            clashes.append((first, f, dest))
    if clashes:
        a, b, dest = clashes[0]
        raise CamsegError(
            f"input={root}: {len(clashes)} input(s) would overwrite another's output, e.g. "
            f"{a.relative_to(root) if root.is_dir() else a.name} and "
            f"{b.relative_to(root) if root.is_dir() else b.name} both give {dest}; "
            "rename or move one of each pair"
        )


def predict_volume(
    model: Segmenter, f: Path, root: Path, out: Path, batch_size: int, windows: str | None
) -> Path:
    """Segment a NIfTI volume slice by slice; write a uint8 mask volume with the same affine."""
    nib = import_optional("nibabel", f"{f}: reading NIfTI")
    apply_orientation, axcodes2ornt, io_orientation, ornt_transform = (
        nib.orientations.apply_orientation,
        nib.orientations.axcodes2ornt,
        nib.orientations.io_orientation,
        nib.orientations.ornt_transform,
    )

    from camseg.data.prepare.ctich import display_slice
    from camseg.data.prepare.windowing import apply_windows, parse_windows

    try:
        img: Any = nib.load(f)
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as e:
        raise CamsegError(f"{f}: cannot read NIfTI ({e})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CamsegError(f"{f}: volume has shape {data.shape}; expected 3D")
    wins = parse_windows(
        windows or ("brain,subdural,bone" if model.base_channels == 3 else "brain")
    )
    if len(wins) != model.base_channels:
        raise CamsegError(
            f"windows={windows}: {len(wins)} window(s) but the model takes {model.base_channels} channel(s) per slice"
        )
    start = io_orientation(img.affine)
    ras = axcodes2ornt(("R", "A", "S"))
    canonical = apply_orientation(data, ornt_transform(start, ras))
    planes = [
        apply_windows(display_slice(canonical[:, :, z]), wins) for z in range(canonical.shape[2])
    ]
    planes = [p[..., None] if p.ndim == 2 else p for p in planes]
    k, n = model.context_slices, len(planes)
    stacked = [
        np.concatenate([planes[min(max(z + d, 0), n - 1)] for d in range(-k, k + 1)], axis=2)
        for z in range(n)
    ]
    masks: list[np.ndarray] = []
    for chunk in _batches(stacked, batch_size):
        masks += model.predict(chunk)
    # Undo the display transform (row 0 anterior, column 0 right) back to canonical x, y.
    vol = np.stack([m[::-1, ::-1].T for m in masks], axis=2).astype(np.uint8)
    vol = apply_orientation(vol, ornt_transform(ras, start))
    header: Any = img.header.copy()
    header.set_data_dtype(np.uint8)
    mask_img = nib.Nifti1Image(vol, img.affine, header)
    dest = out / f"{_name(f, root)}_mask.nii.gz"
    import gzip
    import io

    buf = io.BytesIO()
    raw = mask_img.to_bytes()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        gz.write(raw)
    write_bytes_atomic(dest, buf.getvalue())
    return dest


def parse_args(argv: list[str]) -> dict[str, str]:
    args: dict[str, str] = {}
    for a in argv:
        if a in ("-h", "--help"):
            print(__doc__)
            sys.exit(0)
        if "=" not in a:
            raise CamsegError(f"argument '{a}': use key=value (ckpt=..., input=..., output=...)")
        k, v = a.split("=", 1)
        args[k.strip()] = v.strip()
    allowed = {
        "ckpt",
        "input",
        "output",
        "device",
        "batch_size",
        "overlays",
        "windows",
        "max_image_pixels",
    }
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise CamsegError(f"unknown argument(s) {unknown}; allowed: {sorted(allowed)}")
    for req in ("ckpt", "input", "output"):
        if req not in args:
            raise CamsegError(
                f"missing {req}=...; usage: camseg-predict ckpt=CKPT input=DIR_OR_FILE output=DIR"
            )
    return args


def parse_batch_size(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise CamsegError(f"batch_size={value}: must be a whole number >= 1, e.g. batch_size=16")
    return n


def parse_max_image_pixels(value: str | None) -> int | None:
    if value is None:
        return DEFAULT_MAX_IMAGE_PIXELS
    if value.lower() in ("none", "null", "0"):
        return None
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 1:
        raise CamsegError(
            f"max_image_pixels={value}: must be a whole number >= 1 (or none for no limit), "
            f"e.g. max_image_pixels={DEFAULT_MAX_IMAGE_PIXELS}"
        )
    return n


def parse_device(value: str) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked against this machine."""
    if value == "auto":
        return value
    # The form first, without torch: a typo answers at once.
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", value):
        raise CamsegError(f"device={value}: not a device; use auto, cpu, cuda or cuda:N")
    import torch

    dev = torch.device(value)
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise CamsegError(
                f"device={value}: CUDA is not available on this machine; use device=cpu or device=auto"
            )
        if dev.index is not None and dev.index >= n:
            raise CamsegError(
                f"device={value}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise CamsegError(
                f"device={value}: MPS is not available on this machine; use device=cpu or device=auto"
            )
    elif dev.type != "cpu":
        raise CamsegError(f"device={value}: not supported; use auto, cpu, cuda or cuda:N")
    return value


def check_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CamsegError(
            f"output={out}: is an existing file; output= names a directory (new or existing)"
        )
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CamsegError(f"output={out}: {parent} is a file, not a directory")
            break


def run(argv: list[str]) -> int:
    """Predict every input; 0 when all succeeded, 1 when some inputs were skipped (listed)."""
    args = parse_args(argv)
    # Every argument is checked before the checkpoint and the images are loaded.
    batch = parse_batch_size(args.get("batch_size", "16"))
    device = parse_device(args.get("device", "auto"))
    src, out = Path(args["input"]), Path(args["output"])
    check_output(out)
    max_pixels = parse_max_image_pixels(args.get("max_image_pixels"))
    files = _inputs(src)
    model = Segmenter.load(args["ckpt"], device)
    model.max_image_pixels = max_pixels
    root = src if src.is_dir() else src.parent
    overlays = args.get("overlays", "true").lower() in ("1", "true", "yes")
    vols = [f for f in files if f.name.lower().endswith(VOLUME_SUFFIXES)]
    imgs = [f for f in files if f not in vols]
    check_output_collisions(files, root, out)
    out.mkdir(parents=True, exist_ok=True)
    failed: list[tuple[Path, str]] = []
    if imgs:
        failed += predict_images(model, imgs, root, out, batch, overlays)
    for v in tqdm(vols, desc="volumes", unit="vol", disable=not vols):
        try:
            predict_volume(model, v, root, out, batch, args.get("windows"))
        except CamsegError as e:
            if str(e).startswith("windows="):  # the same for every volume: stop now
                raise
            failed.append((v, str(e).removeprefix(f"{v}: ")))
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


def main() -> None:
    try:
        sys.exit(run(sys.argv[1:]))
    except CamsegError as e:
        print(f"camseg-predict: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
