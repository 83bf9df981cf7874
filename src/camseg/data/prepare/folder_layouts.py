"""The layouts of folder-per-class datasets that ``camseg-data folder`` reads.

Each class folder is read in one of two layouts, chosen per folder:

* **flat**: ``SRC/<class>/<image>``, masks (with ``--mask-suffix``) beside their image:
  ``img.png`` + ``img_mask.png`` (+ ``img_mask_1.png``, ... merged by union);
* **images + masks**: ``SRC/<class>/images/<image>`` and ``SRC/<class>/masks/<mask>`` (or
  ``mask/``; any letter case), as in public copies of breast-ultrasound and skin-lesion sets.
  A mask belongs to the image with the same stem, with or without a suffix from
  :data:`MASK_SUFFIXES` (or ``--mask-suffix``) and an optional ``_<n>``:
  ``benign (1).png`` <- ``benign (1)_mask.png``, ``benign (1)_mask_1.png``;
  ``ISIC_0000000.jpg`` <- ``ISIC_0000000_segmentation.png``.

A mask that matches no image is reported (``mask_without_image``, an error under
``--strict``); a class whose masks folder matches none of its images is refused, since its
names follow a scheme the converter does not know.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from camseg.data.prepare.common import IMAGE_EXTENSIONS, Issue
from camseg.errors import DatasetError

IMAGES_DIRS = ("images",)
MASKS_DIRS = ("masks", "mask")
# Suffixes between an image's stem and its mask's in the images + masks layout (any case).
MASK_SUFFIXES = ("_mask", "-mask", "_masks", "_seg", "-seg", "_segmentation", "_label", "_gt")
LAYOUTS_HELP = (
    "understood layouts: SRC/<class>/<image> (masks beside images: <stem><suffix>.<ext> with "
    "--mask-suffix), and SRC/<class>/images/<image> + SRC/<class>/masks/<mask> (or mask/; masks "
    f"named <stem>[suffix][_<n>].<ext>, suffix one of {list(MASK_SUFFIXES)} or --mask-suffix); "
    f"image extensions {list(IMAGE_EXTENSIONS)}"
)


@dataclass
class Item:
    """One image of a class folder and its mask files (merged by union)."""

    cls: str
    image: Path
    masks: list[Path] = field(default_factory=list)


def natural_key(text: str) -> list[object]:
    """Sort key that orders ``img2`` before ``img10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _sorted_files(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if not p.name.startswith(".")),
        key=lambda p: natural_key(p.name),
    )


def _subfolder(folder: Path, names: tuple[str, ...]) -> Path | None:
    for p in _sorted_files(folder):
        if p.is_dir() and p.name.lower() in names:
            return p
    return None


def _is_image(p: Path, where: str, cls: str, issues: list[Issue]) -> bool:
    """True for an image file; a folder or another file is reported and skipped."""
    if p.is_dir():
        issues.append(Issue("nested_folder", cls, None, where, "subfolders are not read; skipped"))
        return False
    if p.suffix.lower() not in IMAGE_EXTENSIONS:
        issues.append(
            Issue(
                "not_an_image",
                cls,
                None,
                where,
                f"extension not in {list(IMAGE_EXTENSIONS)}; skipped",
            )
        )
        return False
    return True


def _add_image(images: dict[str, Item], cls: str, p: Path) -> None:
    if p.stem in images:
        raise DatasetError(
            f"{p}: same name as {images[p.stem].image.name} with another extension; keep one file per image"
        )
    images[p.stem] = Item(cls, p)


def _attach(
    images: dict[str, Item],
    mask: Path,
    base: str,
    cls: str,
    where: str,
    near: str,
    issues: list[Issue],
) -> bool:
    """Give ``mask`` to the image ``base``; report it when there is none. True if attached."""
    if base in images:
        images[base].masks.append(mask)
        return True
    issues.append(
        Issue(
            "mask_without_image", cls, None, where, f"no image named '{base}' {near}; mask skipped"
        )
    )
    return False


def scan_class(
    folder: Path, mask_suffix: str | None, issues: list[Issue]
) -> tuple[list[Item], bool]:
    """The images of one class folder, in its layout; True when that layout has masks."""
    images_dir = _subfolder(folder, IMAGES_DIRS)
    if images_dir is not None:
        return _scan_images_masks(folder, images_dir, mask_suffix, issues)
    return _scan_flat(folder, folder.name, mask_suffix, issues), False


def _scan_flat(folder: Path, cls: str, mask_suffix: str | None, issues: list[Issue]) -> list[Item]:
    images: dict[str, Item] = {}
    mask_files: list[tuple[Path, str]] = []
    mask_re = (
        re.compile(rf"^(?P<base>.+?){re.escape(mask_suffix)}(?:_\d+)?$") if mask_suffix else None
    )
    for p in _sorted_files(folder):
        if not _is_image(p, f"{cls}/{p.name}", cls, issues):
            continue
        m = mask_re.match(p.stem) if mask_re else None
        if m is not None:
            mask_files.append((p, m.group("base")))
        else:
            _add_image(images, cls, p)
    for p, base in mask_files:
        _attach(images, p, base, cls, f"{cls}/{p.name}", "beside this mask", issues)
    return list(images.values())


def _scan_images_masks(
    folder: Path, images_dir: Path, mask_suffix: str | None, issues: list[Issue]
) -> tuple[list[Item], bool]:
    cls = folder.name
    masks_dir = _subfolder(folder, MASKS_DIRS)
    for p in _sorted_files(folder):
        if p not in (images_dir, masks_dir):
            issues.append(
                Issue(
                    "not_read",
                    cls,
                    None,
                    f"{cls}/{p.name}",
                    f"the class folder holds {images_dir.name}/ and masks: "
                    "nothing else in it is read; skipped",
                )
            )
    images: dict[str, Item] = {}
    for p in _sorted_files(images_dir):
        if _is_image(p, f"{cls}/{images_dir.name}/{p.name}", cls, issues):
            _add_image(images, cls, p)
    if masks_dir is None:
        return list(images.values()), False
    suffixes = "|".join(
        re.escape(s) for s in (*([mask_suffix] if mask_suffix else []), *MASK_SUFFIXES)
    )
    mask_re = re.compile(rf"^(?P<base>.+?)(?:{suffixes})(?:_\d+)?$", re.IGNORECASE)
    masks = [
        p
        for p in _sorted_files(masks_dir)
        if _is_image(p, f"{cls}/{masks_dir.name}/{p.name}", cls, issues)
    ]
    attached = 0
    for p in masks:
        m = mask_re.match(p.stem)
        base = p.stem if p.stem in images or m is None else m.group("base")
        where = f"{cls}/{masks_dir.name}/{p.name}"
        attached += _attach(images, p, base, cls, where, "in the images folder", issues)
    if masks and images and not attached:
        raise DatasetError(
            f"{masks_dir}: none of its {len(masks)} masks matches an image of {images_dir} by name "
            f"(first mask '{masks[0].name}', first image '{next(iter(images.values())).image.name}'); "
            f"masks must be named <image stem>[suffix][_<n>], suffix one of {list(MASK_SUFFIXES)}: "
            "rename them or pass --mask-suffix"
        )
    return list(images.values()), True
