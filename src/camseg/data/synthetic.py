"""Deterministic synthetic CT-like dataset: the embedded default for the demo, the tests and CI.

Each patient is a small volume of axial slices rendered from a handful of random anatomy
parameters, so neighbouring slices are coherent (organs change size smoothly, texture drifts,
a lesion spans a few consecutive slices with a rounded radius profile) and 2.5D input is
meaningful. Two flavors:

* ``hemorrhage``: head cross-section. Brain tissue with texture, a bright skull ring, dark
  ventricles and sulcal CSF; hyperdense lesions that are brighter than brain and darker than
  bone: irregular intraparenchymal blobs (unions of ellipses with a noisy boundary) and
  subdural-like crescents along the inner table. Distractors in every class: calcification-like
  bright spots and a bright falx line.
* ``nodule``: chest cross-section. Body with fat and soft tissue, two dark lung fields, heart,
  spine, ribs and sternum; vessels as moving bright dots and short lines inside the lungs
  (distractors in every class); round-ish, slightly lobulated nodules (solid or ground-glass)
  inside the lung fields as lesions.

Presets (``generate(preset=...)``, :mod:`camseg.data.synthetic_presets`) render other data
through the same writer: ``realistic-hemorrhage`` is head CT in Hounsfield units written as
three CT windows (RGB), with few positive slices and small lesions, shaped like real data.

The image-level label is exactly "the mask is not empty": every positive slice has at least
``min_lesion_area(size)`` lesion pixels (a preset keeps its own small sizes instead, one pixel
at least) and every negative mask is all zero.

Randomness: patient ``i`` draws from ``SeedSequence(seed, spawn_key=(i,))``, split into
independent streams for labels, anatomy, lesions and the shortcut marker. A patient's slices
therefore do not depend on how many patients are generated, and changing ``lesion_prob`` or
``shortcut_marker_prob`` leaves the anatomy untouched. Files are byte-identical for the same
arguments on the same platform and numpy version (PNGs carry no metadata).

This module writes the dataset; the slices come from :mod:`camseg.data.synthetic_render`
(labels, lesions, noise) and :mod:`camseg.data.synthetic_phantoms` (head and chest anatomy).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from camseg import __version__
from camseg.data.folder import LABELS_CSV
from camseg.data.progress import progress
from camseg.data.synthetic_presets import LesionRecord, get_preset, render_realistic_volume
from camseg.data.synthetic_render import min_lesion_area as min_lesion_area  # re-export
from camseg.data.synthetic_render import render_volume
from camseg.errors import ConfigError, DatasetError
from camseg.utils.io import png_bytes, read_json, remove_path, write_json_atomic

FLAVORS = ("hemorrhage", "nodule")
# The generation arguments of a dataset made on first use (data=synthetic), beside labels.csv.
SPEC_JSON = "synthetic.json"
MIN_SIZE = 32
# Negatives carry the shortcut marker this much less often than positives.
MARKER_NEGATIVE_FACTOR = 0.2
# Progress bar only for runs at least this large (slices).
PROGRESS_MIN_SLICES = 200
# Presets only: one row per lesion and slice (image, kind, pixels).
LESIONS_CSV = "lesions.csv"


def marker_box(size: int) -> tuple[slice, slice]:
    """Rows and columns of the shortcut marker: a small square near the top-left corner."""
    side, off = max(3, round(size / 20)), max(1, size // 32)
    return slice(off, off + side), slice(off, off + side)


@dataclass(frozen=True)
class _Spec:
    """The arguments that determine a dataset's bytes, in :func:`generate`'s order."""

    flavor: str
    patients: int
    slices_per_patient: int
    size: int
    seed: int
    shortcut_marker_prob: float
    lesion_prob: float
    preset: str | None = None

    def check(self) -> None:
        if self.flavor not in FLAVORS:
            raise ConfigError(
                f"synthetic: flavor '{self.flavor}' is unknown; use one of {list(FLAVORS)}"
            )
        if self.preset is not None and self.flavor != get_preset(self.preset).flavor:
            raise ConfigError(
                f"synthetic: preset '{self.preset}' renders flavor "
                f"'{get_preset(self.preset).flavor}', not '{self.flavor}'; drop the flavor"
            )
        lows = {"patients": 1, "slices_per_patient": 1, "size": MIN_SIZE, "seed": 0}
        for name, low in lows.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
                raise ConfigError(f"synthetic: {name}={value!r}; use an integer >= {low}")
        for name in ("shortcut_marker_prob", "lesion_prob"):
            p = getattr(self, name)
            if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
                raise ConfigError(f"synthetic: {name}={p!r}; use a probability between 0 and 1")


_WHAT = {
    "hemorrhage": "axial head CT-like slices (scalp, skull, brain, ventricles). Lesions are "
    "hyperdense intraparenchymal blobs and subdural-like crescents along the skull. "
    "Calcification-like bright spots and a bright falx line appear in both classes.",
    "nodule": "axial chest CT-like slices (body, lungs, heart, spine, ribs). Lesions are "
    "round-ish solid or ground-glass nodules inside the lungs. Vessels (bright dots and short "
    "lines in the lungs) appear in both classes.",
}


def _readme(spec: _Spec, n_pos: int, n_marked: tuple[int, int]) -> str:
    total = spec.patients * spec.slices_per_patient
    # Strings in double quotes, as ruff writes Python; no preset: the README of before presets.
    fields = {k: v for k, v in asdict(spec).items() if not (k == "preset" and v is None)}
    args = ",\n    ".join(
        f'{k}="{v}"' if isinstance(v, str) else f"{k}={v!r}" for k, v in fields.items()
    )
    what = get_preset(spec.preset).description if spec.preset else _WHAT[spec.flavor]
    title = spec.preset or spec.flavor
    pixels = "RGB (3 CT windows)" if spec.preset else "grayscale"
    side = (
        "\n`lesions.csv` lists each lesion on each slice: `image,kind,pixels`."
        if spec.preset
        else ""
    )
    marker = (
        f"A bright square near the top-left corner (a label-correlated shortcut, see the "
        f"`generate` docstring) is drawn on {n_marked[0]} positive and {n_marked[1]} negative "
        f"slices; masks never include it."
        if spec.shortcut_marker_prob > 0
        else "No shortcut marker."
    )
    return f"""# Synthetic camseg dataset: {title}

Not patient data: {what}

Generated by `camseg.data.synthetic` (camseg {__version__}); re-create it byte for byte with:

```python
from camseg.data.synthetic import generate
generate(
    "OUT",
    {args},
)
```

| parameter | value |
|---|---|
| flavor | {spec.flavor} |
| seed | {spec.seed} |
| patients | {spec.patients} (groups `P000`, `P001`, ...) |
| slices per patient | {spec.slices_per_patient} |
| image size | {spec.size} x {spec.size}, 8-bit {pixels} |
| slices | {total} ({n_pos} positive, {total - n_pos} negative) |
| lesion_prob | {spec.lesion_prob} |
| shortcut_marker_prob | {spec.shortcut_marker_prob} |

{marker}

Layout: `labels.csv` with columns `image,mask,group,slice,{spec.flavor}`;
`images/<patient>_<slice>.png` and `masks/<patient>_<slice>.png` (0 background, 1 lesion).
A slice is labelled 1 exactly when its mask is not empty. The slices of one patient form one
coherent volume: a lesion spans consecutive slices.{side}
"""


def generate(
    out: str | Path,
    flavor: str = "hemorrhage",
    patients: int | None = None,
    slices_per_patient: int | None = None,
    size: int | None = None,
    seed: int = 0,
    shortcut_marker_prob: float = 0.0,
    lesion_prob: float | None = None,
    overwrite: bool = False,
    preset: str | None = None,
) -> Path:
    """Write a synthetic dataset in the camseg folder format and return its root.

    The root is built in a sibling ``OUT.partial-<pid>`` directory and renamed onto ``out``
    only when complete. Every dataset can train a classifier: patient ``P000`` always has a
    positive slice and ``P001`` (or ``P000`` when it is the only patient and has more than
    one slice) a negative one, even at ``lesion_prob`` 0 or 1.

    Args:
        out: dataset root to create.
        flavor: ``"hemorrhage"`` (head CT) or ``"nodule"`` (chest CT); also the class column.
        patients: number of patients (groups ``P000``, ``P001``, ...); default 40 (or the
            preset's).
        slices_per_patient: slices per patient volume; default 16 (or the preset's).
        size: image height and width in pixels (>= 32); default 128 (or the preset's).
        seed: non-negative integer; the same arguments give byte-identical files.
        shortcut_marker_prob: probability p of drawing a bright square marker near the
            top-left corner on a positive slice (p / 5 on a negative one). It imitates the
            label-correlated shortcuts (hospital tokens, "portable" tags) that CAMs caught
            chest X-ray classifiers relying on: with p > 0 a classifier can score well while
            its CAMs point at the corner instead of the lesion. Masks never include it, and the
            rest of every image is the same as with p = 0.
        lesion_prob: expected fraction of slices that show a lesion; default 0.5 (or the
            preset's).
        overwrite: replace an existing non-empty ``out`` (only after the new one is complete).
        preset: ``None`` or a name from :data:`camseg.data.synthetic_presets.PRESETS`
            (``"realistic-hemorrhage"``: HU head CT as three CT windows in RGB, about 12 %
            positive slices with lesions of 0.1-3 % of the slice); it renders the slices
            and sets the defaults above, which explicit arguments override.

    Raises:
        ConfigError: an argument out of range.
        DatasetError: ``out`` exists and is not empty, and ``overwrite`` is False.
    """
    base = get_preset(preset) if preset is not None else None
    spec = _Spec(
        flavor,
        patients if patients is not None else (base.patients if base else 40),
        slices_per_patient
        if slices_per_patient is not None
        else (base.slices_per_patient if base else 16),
        size if size is not None else (base.size if base else 128),
        seed,
        shortcut_marker_prob,
        lesion_prob if lesion_prob is not None else (base.lesion_prob if base else 0.5),
        preset,
    )
    spec.check()
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(
            f"{out}: already exists and is not empty; "
            "choose a new folder or pass overwrite=True to replace it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    remove_path(partial, out.parent)
    try:
        n_pos, n_marked = _write_dataset(partial, spec)
        readme = _readme(spec, n_pos, n_marked)
        (partial / "README.md").write_text(readme, encoding="utf-8")
        _replace(partial, out, overwrite)
    finally:
        remove_path(partial, out.parent)
    return out


def _write_dataset(root: Path, spec: _Spec) -> tuple[int, tuple[int, int]]:
    """Render every patient into ``root``; return (#positives, (#marked pos, #marked neg))."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    m, p = spec.slices_per_patient, spec.shortcut_marker_prob
    width = max(3, len(str(spec.patients - 1)))
    box = marker_box(spec.size)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "mask", "group", "slice", spec.flavor])
    side = io.StringIO()
    side_writer = csv.writer(side, lineterminator="\n")
    side_writer.writerow(["image", "kind", "pixels"])
    n_pos, marked_pos, marked_neg = 0, 0, 0
    for i in progress(
        range(spec.patients),
        desc=f"synthetic {spec.flavor}",
        unit="patient",
        enabled=spec.patients * m >= PROGRESS_MIN_SLICES,
    ):
        pid = f"P{i:0{width}d}"
        volume_ss, marker_ss = np.random.SeedSequence(spec.seed, spawn_key=(i,)).spawn(2)
        force = {"force_positive": i == 0, "force_negative": i == 1 or spec.patients == 1}
        records: list[LesionRecord] = []
        if spec.preset is None:
            images, masks = render_volume(
                volume_ss, spec.flavor, m, spec.size, spec.lesion_prob, **force
            )
        else:
            images, masks, records = render_realistic_volume(
                volume_ss, m, spec.size, spec.lesion_prob, **force
            )
        for r in records:
            side_writer.writerow([f"images/{pid}_{r.slice:03d}.png", r.kind, r.pixels])
        marker_draws = np.random.default_rng(marker_ss).random(m)
        for z in range(m):
            positive = bool(masks[z].any())
            if marker_draws[z] < (p if positive else p * MARKER_NEGATIVE_FACTOR):
                images[z][box] = 255
                marked_pos, marked_neg = marked_pos + positive, marked_neg + (not positive)
            name = f"{pid}_{z:03d}.png"
            # Plain writes: the whole folder is renamed into place only once it is complete.
            (root / "images" / name).write_bytes(png_bytes(images[z]))
            (root / "masks" / name).write_bytes(png_bytes(masks[z]))
            writer.writerow([f"images/{name}", f"masks/{name}", pid, z, int(positive)])
            n_pos += positive
    (root / LABELS_CSV).write_text(buf.getvalue(), encoding="utf-8")
    if spec.preset is not None:
        (root / LESIONS_CSV).write_text(side.getvalue(), encoding="utf-8")
    return n_pos, (marked_pos, marked_neg)


def _replace(partial: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``partial`` onto ``out``; an old ``out`` is removed only afterwards."""
    if not overwrite:
        try:
            os.rename(partial, out)  # atomic; takes the place of an empty folder, never a full one
        except OSError:
            if not (out.is_dir() and any(out.iterdir())):
                raise
            # Another process (another DDP rank, say) finished the same dataset first: keep it.
        return
    old = None
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists() or out.is_symlink():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(partial, out)
    if old is not None:
        remove_path(old, out.parent)


def generate_if_asked(
    root: str | Path, spec: dict | None, data_dir: str | Path | None = None
) -> bool:
    """Generate the synthetic dataset into ``root`` when the data config asks for it.

    Only a config with a generation ``spec`` (``data=synthetic``) generates, and only into
    camseg's own data directory ``data_dir`` (``paths.data_dir``): a mistyped ``data.root``
    is refused, never filled with 640 synthetic images. ``data_dir=None`` (a Python caller
    naming ``root`` itself) generates into ``root``. Returns whether it generated.

    Raises:
        DatasetError: ``root`` lacks a labels.csv and lies outside ``data_dir``.
    """
    root = Path(root)
    if not spec:
        return False
    if (root / LABELS_CSV).is_file():
        _check_generated_with(root, spec)
        return False
    if data_dir is not None:
        base = Path(data_dir).resolve()
        target = root.resolve()
        if target == base or not target.is_relative_to(base):
            raise DatasetError(
                f"data.root={root}: no labels.csv there, and camseg generates its synthetic dataset "
                f"only inside its data directory {base} (paths.data_dir), never into a folder you name; "
                "fix the path, and add data=default to train on your own dataset"
            )
    generate(root, **spec)
    write_json_atomic(root / SPEC_JSON, spec)
    return True


def _check_generated_with(root: Path, spec: dict) -> None:
    """Refuse a generated dataset whose recorded arguments differ from ``spec``.

    The folder name holds most arguments but not all (e.g. ``shortcut_marker_prob``): without
    this check a run asking for other data would silently train on what an earlier run made.
    Datasets generated before the record existed (no ``synthetic.json``) are not checked.
    """
    record = root / SPEC_JSON
    if not record.is_file():
        return
    made = read_json(record)
    if not isinstance(made, dict):
        raise DatasetError(f"{record}: not a JSON object; delete {root} to generate it again")
    differs = [
        f"{k}={made[k]!r} (asked {v!r})" for k, v in spec.items() if k in made and made[k] != v
    ]
    if differs:
        raise DatasetError(
            f"data.root={root} was generated with other arguments: {', '.join(differs)}; "
            "set paths.data_dir (or data.root) to another folder, or delete this one to regenerate it"
        )
