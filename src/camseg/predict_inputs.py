"""What ``camseg-predict`` is given: its arguments, its input files and their output names.

Everything here is checked before the checkpoint is read, without importing torch, so that
``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, NoReturn

from camseg.errors import CamsegError
from camseg.predict_volumes import VOLUME_SUFFIXES, is_dicom_file
from camseg.utils.large import DEFAULT_MAX_IMAGE_PIXELS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def parse_windows_arg(spec: str) -> tuple[Any, ...]:
    from camseg.data.prepare.windowing import parse_windows
    from camseg.errors import ConfigError

    try:
        return parse_windows(spec)
    except ConfigError as e:
        raise CamsegError(str(e).replace("--windows:", f"windows={spec}:")) from None


def list_inputs(path: Path) -> list[Path]:
    """Image files, NIfTI files and DICOM series folders (a folder holding ``.dcm`` files,
    or files with the DICOM preamble, is one series) under ``path``, sorted."""
    if path.is_file():
        if is_dicom_file(path):
            raise CamsegError(
                f"input={path}: a single DICOM file; give the folder that holds its series"
            )
        return [path]
    if not path.is_dir():
        raise CamsegError(f"input={path}: no such file or directory")
    files: list[Path] = []
    series: set[Path] = set()
    for p in sorted(path.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES or p.name.lower().endswith(VOLUME_SUFFIXES):
            files.append(p)
        elif is_dicom_file(p):
            series.add(p.parent)
    if not files and not series:
        raise CamsegError(
            f"input={path}: no images ({', '.join(IMAGE_SUFFIXES)}), NIfTI volumes or DICOM "
            "series found"
        )
    return sorted([*files, *series])


def is_volume(f: Path) -> bool:
    """A NIfTI file or a DICOM series folder (segmented slice by slice as a volume)."""
    return f.is_dir() or f.name.lower().endswith(VOLUME_SUFFIXES)


def output_name(f: Path, root: Path) -> str:
    """The output name of input ``f``: its path relative to the input folder, without suffix.

    ``in/a/b.png`` gives ``masks/a/b.png`` (and ``in/a/v.nii.gz`` gives ``a/v_mask.nii.gz``),
    so ``a/b.png`` and ``a__b.png`` stay apart; :func:`check_output_collisions` refuses
    inputs that still share a name (``x.png`` and ``x.jpg``).
    """
    rel = f.relative_to(root) if root.is_dir() and f != root else Path(f.name)
    stem = rel.as_posix()
    for suf in (".nii.gz", *VOLUME_SUFFIXES, *IMAGE_SUFFIXES):
        if stem.lower().endswith(suf):
            stem = stem[: -len(suf)]
            break
    return stem


def output_path(f: Path, root: Path, out: Path) -> Path:
    """Where the mask predicted for input ``f`` is written (as predict_images and predict_volume spell it)."""
    if is_volume(f):
        return out / f"{output_name(f, root)}_mask.nii.gz"
    return out / "masks" / f"{output_name(f, root)}.png"


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


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line :class:`CamsegError` (exit 2 in :func:`main`)."""

    def error(self, message: str) -> NoReturn:
        raise CamsegError(message)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = _Parser(
        prog="camseg-predict",
        allow_abbrev=False,
        usage="camseg-predict ckpt=CKPT input=DIR_OR_FILE output=DIR [key=value ...]",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for key, help_text in ARGUMENTS.items():
        flags = [f"--{key}"] + ([f"--{key.replace('_', '-')}"] if "_" in key else [])
        p.add_argument(*flags, dest=key, metavar=key.upper(), help=help_text)
    return p


ARGUMENTS = {
    "ckpt": "stage-3 checkpoint (runs/<run>/seg/checkpoints/best.ckpt)",
    "input": "an image, a NIfTI volume, a DICOM series folder, or a folder of them",
    "output": "output directory (created; existing files of the same names are replaced)",
    "device": "auto (default), cpu, cuda, cuda:N or mps",
    "batch_size": "slices or images per forward pass (default 16)",
    "overlays": "write overlays of 2D images: true (default) or false",
    "windows": "CT windows for a checkpoint that records none, e.g. lung or 40/80",
    "max_image_pixels": f"bounded working size above this (default {DEFAULT_MAX_IMAGE_PIXELS}; none)",
}


def parse_args(argv: list[str], description: str | None = None) -> dict[str, str]:
    """``key=value`` or ``--key value`` (both spellings) -> the given arguments.

    Raises:
        CamsegError: an unknown or malformed argument, or a missing ckpt/input/output.
    """
    translated: list[str] = []
    unknown: list[str] = []
    takes_value = False  # the previous token was ``--key`` without ``=value``
    for a in argv:
        if takes_value or a.startswith("-"):
            translated.append(a)
            takes_value = a.startswith("--") and "=" not in a and not takes_value
        elif "=" in a:
            k, v = a.split("=", 1)
            if k.strip() not in ARGUMENTS:
                unknown.append(k.strip())
            translated.append(f"--{k.strip()}={v.strip()}")
        else:
            raise CamsegError(
                f"argument '{a}': use key=value or --key value (ckpt=..., input=..., output=...)"
            )
    if unknown:
        raise CamsegError(f"unknown argument(s) {sorted(unknown)}; allowed: {sorted(ARGUMENTS)}")
    try:
        ns = build_parser(description).parse_args(translated)
    except CamsegError as e:
        if "unrecognized arguments" in str(e):
            raise CamsegError(f"{e}; allowed: {sorted(ARGUMENTS)}") from None
        raise
    args = {k: v for k, v in vars(ns).items() if v is not None}
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
