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
from tqdm import tqdm

from camseg.data.prepare.common import (
    add_output_options,
    check_out_dir,
    finish,
    print_summary,
    staged_output,
)
from camseg.errors import ConfigError, DatasetError
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
    src = Path(src)
    if not src.is_dir():
        raise DatasetError(
            f"{src}: source folder not found; point SRC at the unzipped Kaggle download"
        )
    if patients is not None and patients < 1:
        raise ConfigError(f"--patients is {patients}; give a positive number of patients")
    root = find_kaggle_root(src)
    out = check_out_dir(Path(out), src, overwrite)
    cases = sorted(p for p in root.iterdir() if p.is_dir() and _CASE.match(p.name))
    if patients is not None:
        chosen = sorted({patient_of(c.name) for c in cases})[:patients]
        cases = [c for c in cases if patient_of(c.name) in chosen]

    rows: list[list[object]] = []
    with staged_output(out) as stage:
        for case_dir in tqdm(cases, desc="lgg-mri", unit="patient", disable=not progress):
            case, group = case_dir.name, patient_of(case_dir.name)
            for n, image_path, mask_path in case_slices(case_dir):
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
                rows.append([f"images/{name}", f"masks/{name}", group, n, int(fg.any())])
        if not rows:
            raise DatasetError(
                f"{root}: the case folders hold no <case>_<n>.tif slices; re-extract the download"
            )
        finish(
            stage,
            header=HEADER,
            rows=rows,
            classes=["tumor"],
            issues=[],
            readme=_readme(rows),
            positives_fix="convert more patients (--patients)",
        )
    if progress:
        print_summary("lgg-mri", out, rows, [])
    return out


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
    p = subparsers.add_parser(
        "lgg-mri",
        help="Kaggle LGG brain MRI (kaggle_3m) -> camseg folder format",
        description="Convert the Kaggle LGG MRI segmentation download (kaggle_3m) to the camseg folder format.",
    )
    p.add_argument("src", type=Path, metavar="SRC", help="kaggle_3m or a folder above it")
    p.add_argument("--out", type=Path, required=True, help="destination dataset root")
    p.add_argument(
        "--patients", type=int, default=None, metavar="N", help="first N patients (sorted) only"
    )
    add_output_options(p, strict=False)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    convert_lgg_mri(
        args.src,
        args.out,
        patients=args.patients,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    return 0
