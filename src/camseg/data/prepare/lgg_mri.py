"""LGG brain MRI (Buda et al., Kaggle ``mateuszbuda/lgg-mri-segmentation``) -> camseg folder format.

Source: ``kaggle_3m/<case>/<case>_<n>.tif`` (RGB 256x256 = pre-contrast, FLAIR,
post-contrast) and ``<case>_<n>_mask.tif`` (0/255), ``<case>`` like
``TCGA_CS_4941_19960909``. Output, the layout of the project's ``lgg-mri-40`` benchmark:
``images/<case>_<n:03d>.png`` (RGB), ``masks/<case>_<n:03d>.png`` (0/1) and
``labels.csv`` with ``image,mask,group,slice,tumor``; group = patient ``TCGA_XX_NNNN``,
slice = the file's ``n`` (1-based), tumor = mask non-empty. Slices sort as integers.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import tifffile

from camseg.data.prepare.common import (
    add_converter_parser,
    check_first_n,
    check_out_dir,
    cli_runner,
    conversion,
    require_source_dir,
)
from camseg.data.progress import progress as progress_of
from camseg.errors import DatasetError
from camseg.utils.io import save_png_atomic

HEADER = ("image", "mask", "group", "slice", "tumor")
_CASE = re.compile(r"^TCGA_[A-Za-z0-9]+_[A-Za-z0-9]+_\w+$")


def find_kaggle_root(src: Path) -> Path:
    """The folder holding the ``TCGA_*`` case folders: SRC, SRC/kaggle_3m or SRC/lgg-mri-segmentation/kaggle_3m."""
    for root in (src, src / "kaggle_3m", src / "lgg-mri-segmentation" / "kaggle_3m"):
        if root.is_dir() and any(p.is_dir() and _CASE.match(p.name) for p in root.iterdir()):
            return root
    raise DatasetError(
        f"{src}: no TCGA_* case folders here, in kaggle_3m/ or in lgg-mri-segmentation/kaggle_3m/; "
        "point SRC at the unzipped Kaggle download"
    )


def patient_of(case: str) -> str:
    """``TCGA_CS_4941_19960909`` -> ``TCGA_CS_4941``."""
    return "_".join(case.split("_")[:3])


def case_slices(case_dir: Path) -> list[tuple[int, Path, Path]]:
    """(n, image, mask) of one case, sorted by the integer n."""
    case = case_dir.name
    pattern = re.compile(rf"^{re.escape(case)}_(\d+)(_mask)?\.tiff?$", re.IGNORECASE)
    images: dict[int, Path] = {}
    masks: dict[int, Path] = {}
    for p in case_dir.iterdir():
        m = pattern.match(p.name)
        if m is None:
            continue
        (masks if m.group(2) else images)[int(m.group(1))] = p
    if orphans := sorted(set(masks) - set(images)):
        n = orphans[0]
        raise DatasetError(
            f"{masks[n]}: mask without its image {case}_{n}.tif; re-extract the download"
        )
    if unmasked := sorted(set(images) - set(masks)):
        n = unmasked[0]
        raise DatasetError(
            f"{images[n]}: no mask {case}_{n}_mask.tif beside it; re-extract the download"
        )
    return [(n, images[n], masks[n]) for n in sorted(images)]


def _read_tif(path: Path) -> np.ndarray:
    try:
        return np.asarray(tifffile.imread(path))
    except Exception as e:  # tifffile raises several types for damaged files
        raise DatasetError(f"{path}: cannot read TIFF ({e}); re-extract the download") from None


def convert_lgg_mri(
    src: str | Path,
    out: str | Path,
    *,
    patients: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert the Kaggle LGG MRI download to a camseg dataset root.

    Args:
        src: ``kaggle_3m``, its parent, or a folder holding ``lgg-mri-segmentation/kaggle_3m``.
        out: destination; must be empty or absent unless ``overwrite``.
        patients: only the first N patients in sorted order.
        overwrite: replace a non-empty ``out``.
        progress: show a progress bar and print a summary.
    """
    src = require_source_dir(Path(src), "point SRC at the unzipped Kaggle download")
    check_first_n(patients)
    root = find_kaggle_root(src)
    out = check_out_dir(Path(out), src, overwrite)
    cases = sorted(p for p in root.iterdir() if p.is_dir() and _CASE.match(p.name))
    if patients is not None:
        chosen = sorted({patient_of(c.name) for c in cases})[:patients]
        cases = [c for c in cases if patient_of(c.name) in chosen]

    with conversion("lgg-mri", out, progress=progress) as conv:
        for case_dir in progress_of(cases, desc="lgg-mri", unit="patient", enabled=progress):
            for n, image_path, mask_path in case_slices(case_dir):
                conv.rows.append(
                    _convert_slice(conv.stage, case_dir.name, n, image_path, mask_path)
                )
        if not conv.rows:
            raise DatasetError(
                f"{root}: the case folders hold no <case>_<n>.tif slices; re-extract the download"
            )
        conv.finish(
            header=HEADER,
            classes=["tumor"],
            readme=lambda: _readme(conv.rows),
            positives_fix="convert more patients (--patients)",
        )
    return out


def _convert_slice(
    stage: Path, case: str, n: int, image_path: Path, mask_path: Path
) -> list[object]:
    """Write one slice's image and mask into ``stage``; return its labels.csv row."""
    image, mask = _read_tif(image_path), _read_tif(mask_path)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DatasetError(
            f"{image_path}: expected an RGB uint8 image, got shape {image.shape} {image.dtype}; "
            "is this the Kaggle kaggle_3m folder?"
        )
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    if mask.shape != image.shape[:2]:
        raise DatasetError(
            f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
            f"{image.shape[1]}x{image.shape[0]}; re-extract the download"
        )
    fg = mask > 0
    name = f"{case}_{n:03d}.png"
    save_png_atomic(stage / "images" / name, np.ascontiguousarray(image))
    save_png_atomic(stage / "masks" / name, fg.astype(np.uint8))
    return [f"images/{name}", f"masks/{name}", patient_of(case), n, int(fg.any())]


def _readme(rows: list[list[object]]) -> str:
    n_pos = sum(int(r[4]) for r in rows)  # type: ignore[call-overload]
    return (
        "# LGG brain MRI in camseg's folder format\n\n"
        "Converted by `camseg-data lgg-mri` from the LGG segmentation dataset (Buda, Saha, Mazurowski, "
        "Computers in Biology and Medicine 109, 2019; images from TCIA TCGA-LGG), Kaggle "
        "mateuszbuda/lgg-mri-segmentation. License: CC BY-NC-SA 4.0 (non-commercial, share-alike): "
        "never commit it into the project.\n\n"
        f"- {len(rows)} axial slices from {len({r[2] for r in rows})} patients, RGB = pre-contrast, FLAIR, "
        f"post-contrast; {n_pos} show tumour, {len(rows) - n_pos} do not\n"
        "- `labels.csv`: `image`, `mask`, `group` (patient id), `slice` (1-based, as in the file names), "
        "`tumor` (0/1)\n"
        "- `masks/*.png`: 0 background, 1 tumour (FLAIR abnormality)\n"
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_converter_parser(
        subparsers,
        "lgg-mri",
        help="Kaggle LGG brain MRI (kaggle_3m) -> camseg folder format",
        description="Convert the Kaggle LGG MRI segmentation download (kaggle_3m) to the camseg folder format.",
        src_help="kaggle_3m or a folder above it",
        strict=False,
    )
    p.add_argument(
        "--patients", type=int, default=None, metavar="N", help="first N patients (sorted) only"
    )
    p.set_defaults(func=cli_runner(convert_lgg_mri, "patients"))
