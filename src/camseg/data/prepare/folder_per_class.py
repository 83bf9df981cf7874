"""Folder-per-class datasets (``SRC/<class>/<image>``) -> camseg folder format.

Two layouts are read (:mod:`~camseg.data.prepare.folder_layouts`): images directly in the
class folder, optional masks beside them with a suffix (``img.png`` + ``img_mask.png``, and
``img_mask_1.png``, ``img_mask_2.png``, ... when one image has several, merged by union); or
``<class>/images/`` + ``<class>/masks/`` (or ``mask/``), masks matched by file stem.
A class declared negative (``--negative-class normal``) gets all class columns 0 and an
all-zero mask. The mask value of a positive image is the 1-based index of its class among
the non-negative classes in sorted order.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
from PIL import Image

from camseg.data.prepare.common import (
    Conversion,
    Issue,
    add_converter_parser,
    check_out_dir,
    cli_runner,
    conversion,
    issues_note,
    require_source_dir,
)
from camseg.data.prepare.folder_layouts import (
    IMAGES_DIRS,
    LAYOUTS_HELP,
    MASKS_DIRS,
    Item,
    natural_key,
    scan_class,
)
from camseg.data.progress import progress as progress_of
from camseg.errors import ConfigError, DatasetError
from camseg.utils.io import read_image, save_png_atomic

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_id(stem: str) -> str:
    """File-name-safe id: runs of characters other than letters, digits, ``._-`` become ``_``."""
    return _UNSAFE.sub("_", stem).strip("_") or "image"


def read_binary_mask(path: Path) -> np.ndarray:
    """Foreground of a mask file: > 0, or > 127 for JPEG (lossy edges); any colour mode."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "P":
                arr = np.asarray(im)  # palette indices: 0 is background
            elif im.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
                arr = np.asarray(im.convert("RGB")).max(axis=2)
            else:
                arr = np.asarray(im)
    except Exception as e:  # PIL raises several types for damaged files
        raise DatasetError(f"{path}: cannot read mask ({e}); re-export the file") from None
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    threshold = 127 if path.suffix.lower() in (".jpg", ".jpeg") else 0
    return arr > threshold


def _group_of(item: Item, pattern: re.Pattern[str] | None) -> str | None:
    if pattern is None:
        return None
    m = pattern.search(item.image.stem)
    if m is None:
        raise DatasetError(
            f"{item.image}: --group-regex '{pattern.pattern}' does not match the file name '{item.image.stem}'; "
            "fix the regex or rename the file"
        )
    if "group" in pattern.groupindex:
        return m.group("group")
    return m.group(1) if pattern.groups else m.group(0)


def convert_folder(
    src: str | Path,
    out: str | Path,
    *,
    mask_suffix: str | None = None,
    negative_classes: tuple[str, ...] | list[str] = (),
    group_regex: str | None = None,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert ``SRC/<class>/*.{png,jpg,jpeg,tif,tiff,bmp}`` to a camseg dataset root.

    Args:
        src: folder whose subfolders are the classes.
        out: destination; must be empty or absent unless ``overwrite``.
        mask_suffix: e.g. ``_mask``; masks are ``<stem><suffix>[_<n>].<ext>`` beside the image.
        negative_classes: class folders that hold negatives (normal images).
        group_regex: regex searched in the file name (no extension) for the patient id: the
            named group ``group``, else group 1, else the whole match. Default: the image id.
        strict: raise on any reported inconsistency.
        overwrite: replace a non-empty ``out``.
        progress: show a progress bar and print a summary.
    """
    src = require_source_dir(Path(src), "point SRC at the folder holding one subfolder per class")
    if mask_suffix == "":
        raise ConfigError(
            "--mask-suffix is empty; give the text between image name and extension, e.g. _mask"
        )
    out = check_out_dir(Path(out), src, overwrite)
    pattern = _compile_group_regex(group_regex)
    folders = sorted(
        (p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )
    classes = _positive_classes(src, [p.name for p in folders], negative_classes)
    issues: list[Issue] = []
    ids, with_masks = _scan_classes(src, folders, mask_suffix, issues)

    with conversion("folder", out, strict=strict, progress=progress, issues=issues) as conv:
        for sid, item in progress_of(
            sorted(ids.items(), key=lambda kv: natural_key(kv[0])),
            desc="folder",
            unit="image",
            enabled=progress,
        ):
            conv.rows.append(_convert_item(conv, sid, item, classes, with_masks, pattern))
        conv.finish(
            header=["image", *(["mask"] if with_masks else []), "group", *classes],
            classes=classes,
            readme=lambda: _readme(
                src, classes, negative_classes, conv.rows, with_masks, conv.issues
            ),
            positives_fix="add images to that class folder or remove the folder",
        )
    return out


def _scan_classes(
    src: Path, folders: list[Path], mask_suffix: str | None, issues: list[Issue]
) -> tuple[dict[str, Item], bool]:
    """Scan every class folder: the items by unique image id, and whether there are masks."""
    items: list[Item] = []
    with_masks = mask_suffix is not None
    for folder in folders:
        found, has_masks = scan_class(folder, mask_suffix, issues)
        items.extend(found)
        with_masks |= has_masks
    if not items:
        raise DatasetError(f"{src}: no image files in the class folders; {LAYOUTS_HELP}")
    ids: dict[str, Item] = {}
    for item in items:
        sid = safe_id(item.image.stem)
        if sid in ids:
            raise DatasetError(
                f"{item.image}: image id '{sid}' is also the id of {ids[sid].image}; "
                "image names must be unique across class folders: rename one"
            )
        ids[sid] = item
    return ids, with_masks


def _convert_item(
    conv: Conversion,
    sid: str,
    item: Item,
    classes: list[str],
    with_masks: bool,
    pattern: re.Pattern[str] | None,
) -> list[object]:
    """Write one image (and its mask) into the staging folder; return its labels.csv row."""
    try:
        image = read_image(item.image)
    except Exception as e:  # PIL raises several types for damaged files
        raise DatasetError(
            f"{item.image}: cannot read image ({e}); re-export or remove it"
        ) from None
    save_png_atomic(conv.stage / "images" / f"{sid}.png", image)
    labels = [int(item.cls == c) for c in classes]
    row: list[object] = [f"images/{sid}.png"]
    if with_masks:
        row.append(_write_mask(conv.stage, sid, item, image.shape[:2], classes, conv.issues))
    return [*row, _group_of(item, pattern) or sid, *labels]


def _compile_group_regex(group_regex: str | None) -> re.Pattern[str] | None:
    if not group_regex:
        return None
    try:
        return re.compile(group_regex)
    except re.error as e:
        raise ConfigError(
            f"--group-regex '{group_regex}' is not a valid regex ({e}); fix it"
        ) from None


def _positive_classes(
    src: Path, names: list[str], negative_classes: tuple[str, ...] | list[str]
) -> list[str]:
    """The class columns: the folders not declared negative, sorted; reserved names refused."""
    lower = {n.lower() for n in names}
    if lower & set(IMAGES_DIRS) and lower & set(MASKS_DIRS):
        raise DatasetError(
            f"{src}: holds images/ and masks/ folders, the inside of one class; point SRC at the "
            f"folder above the class folders ({LAYOUTS_HELP})"
        )
    unknown = [c for c in negative_classes if c not in names]
    if unknown:
        raise DatasetError(
            f"{src}: --negative-class {unknown} not found; class folders are {names}"
        )
    classes = sorted(n for n in names if n not in negative_classes)
    if not classes:
        raise DatasetError(
            f"{src}: no positive class folder (found {names}); add one folder per class; {LAYOUTS_HELP}"
        )
    for c in classes:
        if c in ("image", "mask", "group", "split", "slice"):
            raise DatasetError(
                f"{src / c}: '{c}' is a reserved column name of labels.csv; rename the class folder"
            )
    return classes


def _write_mask(
    stage: Path,
    sid: str,
    item: Item,
    shape: tuple[int, ...],
    classes: list[str],
    issues: list[Issue],
) -> str:
    """Write the merged mask of ``item``; returns the labels.csv cell ('' when it has none)."""
    rel = f"masks/{sid}.png"
    where = f"{item.cls}/{item.image.name}"
    union = np.zeros(shape, dtype=bool)
    for p in item.masks:
        m = read_binary_mask(p)
        if m.shape != union.shape:
            raise DatasetError(
                f"{p}: mask is {m.shape[1]}x{m.shape[0]} but its image {item.image.name} is "
                f"{shape[1]}x{shape[0]}; masks must have their image's size"
            )
        union |= m
    if item.cls not in classes:
        if union.any():
            issues.append(
                Issue(
                    "mask_on_negative",
                    sid,
                    None,
                    where,
                    f"negative image has a mask with {int(union.sum())} pixels; written as all background",
                )
            )
        save_png_atomic(stage / rel, np.zeros(shape, dtype=np.uint8))
        return rel
    if not item.masks:
        issues.append(
            Issue(
                "missing_mask",
                sid,
                None,
                where,
                "positive image has no mask file; mask cell left empty",
            )
        )
        return ""
    if not union.any():
        issues.append(
            Issue("empty_mask", sid, None, where, "positive image has an all-background mask; kept")
        )
    save_png_atomic(stage / rel, union.astype(np.uint8) * np.uint8(classes.index(item.cls) + 1))
    return rel


def _readme(
    src: Path,
    classes: list[str],
    negatives: tuple[str, ...] | list[str],
    rows: list[list[object]],
    with_masks: bool,
    issues: list[Issue],
) -> str:
    return (
        "# Folder-per-class dataset in camseg's folder format\n\n"
        f"Converted by `camseg-data folder` from {src.name}/ (check the source's license before sharing).\n\n"
        f"- {len(rows)} images; classes (mask value): "
        f"{', '.join(f'{c} ({i})' for i, c in enumerate(classes, start=1))}; "
        f"negative folders: {', '.join(negatives) or 'none'}\n"
        f"- masks: {'0 background, k = class k' if with_masks else 'none'}\n"
        f"{issues_note(issues, 'inconsistencies')}"
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_converter_parser(
        subparsers,
        "folder",
        help="folder-per-class images (+ optional masks) -> camseg folder format",
        description="Convert SRC/<class>/<image> folders, or SRC/<class>/images/ + "
        "SRC/<class>/masks/, to the camseg folder format.",
        src_help="folder with one subfolder per class",
    )
    p.add_argument(
        "--mask-suffix",
        default=None,
        help="masks beside images: <stem><suffix>[_<n>].<ext>, e.g. _mask (several merged by "
        "union); with images/ + masks/ folders, one more suffix to recognise",
    )
    p.add_argument(
        "--negative-class",
        action="append",
        default=[],
        metavar="CLASS",
        help="a class folder of negative (normal) images; repeatable",
    )
    p.add_argument(
        "--group-regex",
        default=None,
        help="regex for the patient id in the file name (named group 'group', else group 1)",
    )
    p.set_defaults(
        func=cli_runner(
            convert_folder, "mask_suffix", "group_regex", negative_classes="negative_class"
        )
    )
