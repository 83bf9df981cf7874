"""PhysioNet CT-ICH (Hssayeni et al., v1.3.1) -> camseg folder format.

Two published layouts are read:

* NIfTI release: ``ct_scans/NNN.nii[.gz]`` (HU), ``masks/NNN.nii[.gz]`` and
  ``hemorrhage_diagnosis_raw_ct.csv`` (``SliceNumber`` = 1-based index along the
  volume's third array axis). Slices are windowed (default brain, subdural, bone -> RGB).
* JPG release: ``Patients_CT/NNN/brain/<n>.jpg`` (already brain-windowed),
  ``<n>_HGE_Seg.jpg`` masks for hemorrhage slices only, and ``hemorrhage_diagnosis.csv``.

Display orientation of the NIfTI release: the volume is reoriented with
``nibabel.as_closest_canonical`` (array axes -> patient Right, Anterior, Superior) and each
axial slice ``A[x, y]`` becomes ``image = A.T[::-1, ::-1]``, i.e.
``image[r, c] = A[X-1-c, Y-1-r]``: row 0 is the most anterior row, column 0 the patient's
right (radiological view, as in a PACS viewer). The mask gets the same transform, computed
from the CT's affine. Output files keep the CSV's slice number: ``images/049_012.png``.
"""

from __future__ import annotations

import argparse
import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tqdm import tqdm

from camseg.data.prepare.common import (
    Issue,
    add_output_options,
    check_out_dir,
    finish,
    print_summary,
    raise_if_strict,
    staged_output,
)
from camseg.data.prepare.windowing import CtWindow, apply_windows, parse_windows
from camseg.data.preprocess import display_slice
from camseg.errors import ConfigError, DatasetError
from camseg.optional import import_optional
from camseg.utils.io import save_png_atomic

if TYPE_CHECKING:
    import nibabel as nib

SUBTYPES = ("Intraventricular", "Intraparenchymal", "Subarachnoid", "Epidural", "Subdural")
NIFTI_CSV = "hemorrhage_diagnosis_raw_ct.csv"
JPG_CSV = "hemorrhage_diagnosis.csv"
DEFAULT_WINDOWS = "brain,subdural,bone"
_REQUIRED_COLUMNS = ("PatientNumber", "SliceNumber", *SUBTYPES, "No_Hemorrhage")
_NIFTI_NAME = re.compile(r"^(\d+)\.nii(\.gz)?$")
_JPG_NAME = re.compile(r"^(\d+)\.jpe?g$", re.IGNORECASE)
_JPG_MASK_NAME = re.compile(r"^(\d+)_HGE_Seg\.jpe?g$", re.IGNORECASE)


@dataclass(frozen=True)
class DiagnosisRow:
    """One slice of the diagnosis CSV."""

    patient: int
    slice: int
    subtypes: tuple[int, ...]
    no_hemorrhage: int
    line: int

    @property
    def hemorrhage(self) -> int:
        return 1 - self.no_hemorrhage


@dataclass(frozen=True)
class _Slice:
    """A converted slice before it becomes a labels.csv row."""

    patient: int
    row: DiagnosisRow
    image: np.ndarray
    mask: np.ndarray | None  # bool (H,W), None when the patient has no mask file


def read_diagnosis_csv(path: Path) -> tuple[dict[tuple[int, int], DiagnosisRow], list[Issue]]:
    """Read a CT-ICH diagnosis CSV keyed by (patient, slice); duplicates are reported."""
    if not path.is_file():
        raise DatasetError(f"{path}: not found; point SRC at the unzipped CT-ICH release folder")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in _REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DatasetError(
                f"{path}: missing column(s) {missing} (header is {header}); is this the CT-ICH diagnosis CSV?"
            )
        # reader.line_num after each row: the file line to quote in messages
        raw_rows = [
            (reader.line_num, {k.strip(): (v or "").strip() for k, v in r.items() if k is not None})
            for r in reader
        ]
    rows: dict[tuple[int, int], DiagnosisRow] = {}
    issues: list[Issue] = []
    for i, r in raw_rows:
        if not any(r.values()):
            continue  # a row of empty cells
        values = {c: _binary_or_int(path, i, c, r.get(c, "")) for c in _REQUIRED_COLUMNS}
        for c in (*SUBTYPES, "No_Hemorrhage"):
            if values[c] not in (0, 1):
                raise DatasetError(
                    f"{path}: line {i}: column '{c}' has value {values[c]}; it must be 0 or 1"
                )
        row = DiagnosisRow(
            patient=values["PatientNumber"],
            slice=values["SliceNumber"],
            subtypes=tuple(values[c] for c in SUBTYPES),
            no_hemorrhage=values["No_Hemorrhage"],
            line=i,
        )
        key = (row.patient, row.slice)
        if key in rows:
            same = (
                rows[key].subtypes == row.subtypes and rows[key].no_hemorrhage == row.no_hemorrhage
            )
            issues.append(
                Issue(
                    "duplicate_row",
                    f"{row.patient:03d}",
                    row.slice,
                    path.name,
                    f"line {i} repeats the slice of line {rows[key].line}"
                    f"{'' if same else ' with different labels'}; the first row is used",
                )
            )
            continue
        rows[key] = row
        if (row.no_hemorrhage == 1) == any(row.subtypes):
            issues.append(
                Issue(
                    "row_contradiction",
                    f"{row.patient:03d}",
                    row.slice,
                    path.name,
                    f"line {i}: No_Hemorrhage={row.no_hemorrhage} but subtypes {dict(zip(SUBTYPES, row.subtypes, strict=True))}; "
                    "the hemorrhage label follows No_Hemorrhage",
                )
            )
    return rows, issues


def _binary_or_int(path: Path, line: int, column: str, value: str) -> int:
    try:
        f = float(value)
    except ValueError:
        raise DatasetError(
            f"{path}: line {line}: column '{column}' has value '{value}'; expected an integer"
        ) from None
    if f != int(f):
        raise DatasetError(
            f"{path}: line {line}: column '{column}' has value '{value}'; expected an integer"
        )
    return int(f)


def detect_layout(src: Path, layout: str = "auto") -> tuple[Path, str]:
    """Find the release folder under ``src`` and its layout ('nifti' or 'jpg')."""
    if not src.is_dir():
        raise DatasetError(
            f"{src}: source folder not found; point SRC at the unzipped CT-ICH release"
        )
    candidates = [
        src,
        *sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")),
    ]
    for root in candidates:
        has_nifti = (root / "ct_scans").is_dir()
        has_jpg = (root / "Patients_CT").is_dir()
        if layout in ("nifti", "auto") and has_nifti:
            return root, "nifti"
        if layout in ("jpg", "auto") and has_jpg:
            return root, "jpg"
    wanted = {"nifti": "ct_scans/", "jpg": "Patients_CT/"}.get(layout, "ct_scans/ or Patients_CT/")
    raise DatasetError(
        f"{src}: no {wanted} folder here or one level down; point SRC at the CT-ICH release folder"
    )


def _canonical(img: nib.Nifti1Image, data: np.ndarray, what: Path) -> tuple[np.ndarray, bool]:
    """Reorient ``data`` (voxel-aligned with ``img``) to RAS+; True if the z axis was flipped."""
    nib = import_optional("nibabel", "reading NIfTI")
    ornt = nib.orientations.io_orientation(img.affine)
    if int(ornt[2, 0]) != 2:
        raise DatasetError(
            f"{what}: the third array axis is not the head-foot axis (orientation {nib.aff2axcodes(img.affine)}); "
            "only axial CT-ICH volumes are supported"
        )
    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, img.affine))
    return np.asarray(canonical.dataobj), bool(ornt[2, 1] < 0)


def _load_volume(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    nib = import_optional("nibabel", "reading NIfTI")
    try:
        img = nib.load(path)
        if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass
            raise TypeError(f"a {type(img).__name__}, not NIfTI")
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as e:  # nibabel raises several types for damaged files
        raise DatasetError(
            f"{path}: cannot read NIfTI ({e}); re-download or re-extract the file"
        ) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DatasetError(f"{path}: volume has shape {data.shape}; expected a 3D (x,y,z) volume")
    return img, data


def _nifti_files(folder: Path) -> dict[int, Path]:
    files: dict[int, Path] = {}
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            m = _NIFTI_NAME.match(p.name)
            if m:
                files.setdefault(int(m.group(1)), p)
    return files


def _iter_nifti(
    root: Path,
    rows: dict[tuple[int, int], DiagnosisRow],
    patients: list[int],
    windows: tuple[CtWindow, ...],
    issues: list[Issue],
    progress: bool,
) -> Iterator[_Slice]:
    cts = _nifti_files(root / "ct_scans")
    masks = _nifti_files(root / "masks")
    for patient in tqdm(patients, desc="ct-ich", unit="patient", disable=not progress):
        pid = f"{patient:03d}"
        ct_path = cts[patient]
        ct_img, ct = _load_volume(ct_path)
        ct_can, z_flipped = _canonical(ct_img, ct, ct_path)
        mask_can = None
        if patient in masks:
            m_img, m = _load_volume(masks[patient])
            if m.shape != ct.shape:
                raise DatasetError(
                    f"{masks[patient]}: mask shape {m.shape} differs from CT {ct_path.name} shape {ct.shape}; "
                    "re-download the mask"
                )
            if not np.allclose(m_img.affine, ct_img.affine, atol=1e-3):
                issues.append(
                    Issue(
                        "mask_affine_differs",
                        pid,
                        None,
                        masks[patient].name,
                        "mask affine differs from the CT's; the mask is used voxel-aligned with the CT",
                    )
                )
            mask_can, _ = _canonical(ct_img, (m > 0).astype(np.uint8), masks[patient])
        else:
            issues.append(
                Issue(
                    "missing_mask",
                    pid,
                    None,
                    f"masks/{ct_path.name}",
                    "no mask file for this CT volume; its slices are written without masks",
                )
            )
        n_slices = ct.shape[2]
        patient_rows = {s: r for (p, s), r in rows.items() if p == patient}
        for s in sorted(set(range(1, n_slices + 1)) - set(patient_rows)):
            issues.append(
                Issue(
                    "slice_without_row",
                    pid,
                    s,
                    ct_path.name,
                    f"volume slice has no row in {NIFTI_CSV}; slice not converted",
                )
            )
        for s in sorted(patient_rows):
            row = patient_rows[s]
            if not 1 <= s <= n_slices:
                issues.append(
                    Issue(
                        "row_without_slice",
                        pid,
                        s,
                        NIFTI_CSV,
                        f"line {row.line}: the volume has slices 1..{n_slices} only; row not converted",
                    )
                )
                continue
            k = n_slices - s if z_flipped else s - 1
            image = apply_windows(display_slice(ct_can[:, :, k]), windows)
            mask = None if mask_can is None else display_slice(mask_can[:, :, k]) > 0
            yield _Slice(patient, row, image, mask)


def _iter_jpg(
    root: Path,
    rows: dict[tuple[int, int], DiagnosisRow],
    patients: list[int],
    folders: dict[int, Path],
    issues: list[Issue],
    progress: bool,
) -> Iterator[_Slice]:
    for patient in tqdm(patients, desc="ct-ich", unit="patient", disable=not progress):
        pid = f"{patient:03d}"
        brain = folders[patient] / "brain"
        images: dict[int, Path] = {}
        masks: dict[int, Path] = {}
        for p in sorted(brain.iterdir()) if brain.is_dir() else []:
            if m := _JPG_NAME.match(p.name):
                images[int(m.group(1))] = p
            elif m := _JPG_MASK_NAME.match(p.name):
                masks[int(m.group(1))] = p
        patient_rows = {s: r for (p, s), r in rows.items() if p == patient}
        for s in sorted(set(images) - set(patient_rows)):
            issues.append(
                Issue(
                    "slice_without_row",
                    pid,
                    s,
                    _rel(images[s], root),
                    f"image has no row in {JPG_CSV}; slice not converted",
                )
            )
        for s in sorted(set(masks) - set(images)):
            issues.append(
                Issue(
                    "mask_without_image",
                    pid,
                    s,
                    _rel(masks[s], root),
                    "mask file has no image beside it; mask not converted",
                )
            )
        for s in sorted(patient_rows):
            row = patient_rows[s]
            if s not in images:
                issues.append(
                    Issue(
                        "row_without_slice",
                        pid,
                        s,
                        JPG_CSV,
                        f"line {row.line}: no image {pid}/brain/{s}.jpg; row not converted",
                    )
                )
                continue
            image = _read_gray(images[s])
            mask = np.zeros(image.shape, dtype=bool)
            if s in masks:
                seg = _read_gray(masks[s])
                if seg.shape != image.shape:
                    raise DatasetError(
                        f"{masks[s]}: mask is {seg.shape[1]}x{seg.shape[0]} but {images[s].name} is "
                        f"{image.shape[1]}x{image.shape[0]}; re-extract the release"
                    )
                mask = seg > 127  # JPEG ringing: binarise at mid-gray
            yield _Slice(patient, row, image, mask)


def _read_gray(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"), dtype=np.uint8).copy()
    except Exception as e:  # PIL raises several types for damaged files
        raise DatasetError(f"{path}: cannot read image ({e}); re-extract the release") from None


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _check_mask(sl: _Slice, issues: list[Issue], csv_name: str) -> None:
    if sl.mask is None:
        return
    pid, has_fg = f"{sl.patient:03d}", bool(sl.mask.any())
    if sl.row.hemorrhage and not has_fg:
        issues.append(
            Issue(
                "label_without_mask",
                pid,
                sl.row.slice,
                csv_name,
                f"line {sl.row.line} says hemorrhage but the mask slice is empty; kept as labelled",
            )
        )
    elif not sl.row.hemorrhage and has_fg:
        issues.append(
            Issue(
                "mask_without_label",
                pid,
                sl.row.slice,
                csv_name,
                f"line {sl.row.line} says No_Hemorrhage but the mask slice has {int(sl.mask.sum())} pixels; kept as labelled",
            )
        )


def _mask_for(sl: _Slice, subtypes: bool) -> np.ndarray | None:
    """The class-index mask to write, or None when the pixels' classes are unknown.

    CT-ICH masks mark hemorrhage without its subtype. With ``subtypes`` a mask is written
    only where that is unambiguous: a slice with exactly one subtype (all foreground ->
    that class) or a slice with none and an empty mask (all background).
    """
    if sl.mask is None:
        return None
    if not subtypes:
        return sl.mask.astype(np.uint8)
    present = [i for i, v in enumerate(sl.row.subtypes) if v]
    if len(present) == 1:
        return sl.mask.astype(np.uint8) * np.uint8(present[0] + 1)
    if not present and not sl.mask.any():
        return np.zeros(sl.mask.shape, dtype=np.uint8)
    return None


def convert_ct_ich(
    src: str | Path,
    out: str | Path,
    *,
    windows: str | tuple[CtWindow, ...] | None = None,
    subtypes: bool = False,
    layout: str = "auto",
    patients: int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert CT-ICH (either layout) to a camseg dataset root at ``out``.

    Args:
        src: the unzipped release folder (or its parent).
        out: destination; must be empty or absent unless ``overwrite``.
        windows: NIfTI release only: 1 or 3 windows, names or ``C/W`` (default brain,subdural,bone).
        subtypes: classes are the five subtypes (multi-label) instead of ``hemorrhage``.
        layout: 'auto', 'nifti' or 'jpg'.
        patients: convert only the first N patients (sorted by number).
        strict: raise on any inconsistency instead of reporting it.
        overwrite: replace a non-empty ``out``.
        progress: show a progress bar and print a summary.

    Returns:
        ``out`` as an absolute path.

    Raises:
        DatasetError: unreadable or malformed source, or inconsistencies under ``strict``.
    """
    src = Path(src)
    if patients is not None and patients < 1:
        raise ConfigError(f"--patients is {patients}; give a positive number of patients")
    root, layout = detect_layout(src, layout)
    if layout == "nifti":  # before anything is written
        import_optional("nibabel", "camseg-data ct-ich (the NIfTI release)")
    out = check_out_dir(Path(out), src, overwrite)
    if layout == "jpg" and windows is not None:
        raise DatasetError(
            "--windows: the JPG release is already brain-windowed; windows apply to the NIfTI release only"
        )
    wins = parse_windows(windows or DEFAULT_WINDOWS) if not isinstance(windows, tuple) else windows
    csv_name = NIFTI_CSV if layout == "nifti" else JPG_CSV
    rows, issues = read_diagnosis_csv(root / csv_name)

    if layout == "nifti":
        volumes = _nifti_files(root / "ct_scans")
        where = "ct_scans"
    else:
        volumes = {
            int(p.name): p
            for p in (root / "Patients_CT").iterdir()
            if p.is_dir() and p.name.isdigit()
        }
        where = "Patients_CT"
    if not volumes:
        raise DatasetError(
            f"{root / where}: no patient volumes (NNN.nii or NNN/ folders); re-extract the release"
        )
    csv_patients = {p for p, _ in rows}
    for p in sorted(csv_patients - set(volumes)):
        issues.append(
            Issue(
                "patient_without_volume",
                f"{p:03d}",
                None,
                csv_name,
                f"patient has rows but no volume in {where}/; rows not converted",
            )
        )
    for p in sorted(set(volumes) - csv_patients):
        issues.append(
            Issue(
                "volume_without_rows",
                f"{p:03d}",
                None,
                _rel(volumes[p], root),
                f"volume has no rows in {csv_name}; not converted",
            )
        )
    selected = sorted(set(volumes) & csv_patients)
    if patients is not None:
        selected = selected[:patients]

    classes = [s.lower() for s in SUBTYPES] if subtypes else ["hemorrhage"]
    header = ["image", "mask", "group", "slice", *classes]
    out_rows: list[list[object]] = []
    with staged_output(out) as stage:
        slices = (
            _iter_nifti(root, rows, selected, wins, issues, progress)
            if layout == "nifti"
            else _iter_jpg(root, rows, selected, volumes, issues, progress)
        )
        for sl in slices:
            _check_mask(sl, issues, csv_name)
            name = f"{sl.patient:03d}_{sl.row.slice:03d}.png"
            save_png_atomic(stage / "images" / name, np.ascontiguousarray(sl.image))
            mask = _mask_for(sl, subtypes)
            if mask is not None:
                save_png_atomic(stage / "masks" / name, np.ascontiguousarray(mask))
            labels = list(sl.row.subtypes) if subtypes else [sl.row.hemorrhage]
            out_rows.append(
                [
                    f"images/{name}",
                    f"masks/{name}" if mask is not None else "",
                    f"{sl.patient:03d}",
                    sl.row.slice,
                    *labels,
                ]
            )
        if strict:
            raise_if_strict(issues, out, "ct-ich")
        finish(
            stage,
            header=header,
            rows=out_rows,
            classes=classes,
            issues=issues,
            readme=_readme(layout, wins, subtypes, out_rows, classes, issues),
            positives_fix="convert more patients (--patients) or drop --subtypes",
        )
    if progress:
        print_summary("ct-ich", out, out_rows, issues)
    return out


def _readme(
    layout: str,
    windows: tuple[CtWindow, ...],
    subtypes: bool,
    rows: list[list[object]],
    classes: list[str],
    issues: list[Issue],
) -> str:
    n_patients = len({r[2] for r in rows})
    pos = {c: sum(int(r[4 + i]) for r in rows) for i, c in enumerate(classes)}  # type: ignore[call-overload]
    wins = ", ".join(f"{w.name} {w.center:g}/{w.width:g}" for w in windows)
    image_note = (
        f"NIfTI volumes windowed as {wins} (HU center/width) -> "
        f"{'RGB' if len(windows) == 3 else 'grayscale'} PNG; row 0 = anterior, column 0 = patient right"
        if layout == "nifti"
        else "the release's brain-window JPGs as grayscale PNG"
    )
    mask_note = (
        "masks: 0 background, k = subtype class k; written only where the slice's subtype is unambiguous"
        if subtypes
        else "masks: 0 background, 1 hemorrhage"
    )
    return (
        "# CT-ICH in camseg's folder format\n\n"
        'Converted by `camseg-data ct-ich` from PhysioNet "Computed Tomography Images for Intracranial '
        'Hemorrhage Detection and Segmentation" v1.3.1 (Hssayeni et al.), '
        "https://physionet.org/content/ct-ich/1.3.1/ . Access and reuse follow PhysioNet's terms for that "
        "project (credentialed/restricted access): do not redistribute or commit this folder.\n\n"
        f"- source layout: {layout}; {len(rows)} slices from {n_patients} patients\n"
        f"- images: {image_note}\n"
        f"- {mask_note}\n"
        f"- classes: {', '.join(f'{c} ({n} positive)' for c, n in pos.items())}\n"
        "- `group` = patient number, `slice` = the CSV's SliceNumber (1-based)\n"
        f"- inconsistencies in the source: {len(issues)}"
        f"{' (see conversion_report.csv)' if issues else ''}\n"
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ct-ich",
        help="PhysioNet CT-ICH (NIfTI or JPG release) -> camseg folder format",
        description="Convert PhysioNet CT-ICH v1.3.1 to the camseg folder format (one PNG per slice).",
    )
    p.add_argument("src", type=Path, metavar="SRC", help="unzipped CT-ICH release folder")
    p.add_argument("--out", type=Path, required=True, help="destination dataset root")
    p.add_argument("--layout", choices=("auto", "nifti", "jpg"), default="auto")
    p.add_argument(
        "--windows",
        default=None,
        help=f"NIfTI only: 1 or 3 windows, names or CENTER/WIDTH (default {DEFAULT_WINDOWS}); "
        "write --windows=-600/1500 for a negative center",
    )
    p.add_argument(
        "--subtypes",
        action="store_true",
        help="five subtype classes instead of 'hemorrhage' (masks only where unambiguous)",
    )
    p.add_argument("--patients", type=int, default=None, metavar="N", help="first N patients only")
    add_output_options(p, strict=True)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    convert_ct_ich(
        args.src,
        args.out,
        windows=args.windows,
        subtypes=args.subtypes,
        layout=args.layout,
        patients=args.patients,
        strict=args.strict,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    return 0
