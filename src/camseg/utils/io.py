"""Atomic file writes and image reading.

Every artifact is written to a temporary name in the same directory and renamed into
place, so a killed process never leaves a half-written file under the final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from camseg.errors import CamsegError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; artifacts get the usual mode
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_path(
    path: str | os.PathLike[str], within: str | os.PathLike[str], ignore_errors: bool = False
) -> None:
    """Delete ``path`` (a folder tree, a file or a link) only if it lies inside ``within``.

    Both are resolved with symlinks followed, and ``path`` must be strictly below
    ``within``: a run name like ``../../x`` or a link pointing elsewhere never gets a
    folder outside deleted. A link is removed itself, never its target. A missing
    ``path`` is nothing to do.

    Raises:
        CamsegError: ``path`` is not inside ``within``.
    """
    p = Path(path)
    if not (p.exists() or p.is_symlink()):
        return
    base = Path(within).resolve()
    # A link is judged by where it sits (its target is not touched), anything else by what it is.
    target = p.parent.resolve() / p.name if p.is_symlink() else p.resolve()
    if target == base or not target.is_relative_to(base):
        raise CamsegError(
            f"refusing to delete {p}: it resolves to {target}, which is not inside {base}; "
            "remove it by hand if it really is to go"
        )
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=ignore_errors)
        return
    try:
        p.unlink()
    except OSError:
        if not ignore_errors:
            raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Strict JSON (NaN and infinities become null), written atomically."""
    text = json.dumps(
        _finite(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False
    )
    write_text_atomic(path, text + "\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        return _finite(obj.item())
    return obj


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):  # torch scalars
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (imported on first use: slow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure_atomic(path: str | os.PathLike[str], fig: Any, **savefig: Any) -> None:
    """A matplotlib figure as a PNG written atomically; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig)
    pyplot().close(fig)
    write_bytes_atomic(path, buf.getvalue())


def png_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array (H,W) or (H,W,3) as PNG, deterministically (no metadata)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def save_png_atomic(path: str | os.PathLike[str], array: np.ndarray) -> None:
    if array.dtype != np.uint8:
        raise TypeError(f"{path}: PNG arrays must be uint8, got {array.dtype}")
    write_bytes_atomic(path, png_bytes(array))


def save_npz_atomic(path: str | os.PathLike[str], **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    write_bytes_atomic(path, buf.getvalue())


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file fully (PNG, JPEG, TIFF, ...) as uint8 (H,W) or (H,W,3).

    Raises ``OSError``/``ValueError`` for unreadable or truncated files.
    """
    with Image.open(path) as im:
        im.load()  # forces full decode: a truncated file fails here, not later
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float32)
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
            return arr.round().astype(np.uint8)
        if im.mode not in ("L", "RGB"):
            # Alpha is dropped; palette and other modes become RGB.
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        return np.asarray(im, dtype=np.uint8).copy()


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a single-channel class-index mask as uint8 (H,W)."""
    with Image.open(path) as im:
        im.load()
        if im.mode not in ("L", "P", "1"):
            raise ValueError(
                f"{path}: mask must be a single-channel PNG with class indices, got mode {im.mode}"
            )
        arr = np.asarray(im.convert("L") if im.mode == "1" else im, dtype=np.uint8)
        if im.mode == "1":
            arr = (arr > 0).astype(np.uint8)
        return arr.copy()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
