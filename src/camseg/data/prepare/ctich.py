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

This module reads the NIfTI release and drives the conversion; the diagnosis CSV and the
label/mask checks are in :mod:`~camseg.data.prepare.ctich_labels`, the JPG release in
:mod:`~camseg.data.prepare.ctich_jpg`.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from camseg.data.prepare.common import (
    Issue,
    add_converter_parser,
    check_first_n,
    check_out_dir,
    cli_runner,
    conversion,
    issues_note,
    require_source_dir,
)
from camseg.data.prepare.ctich_jpg import iter_jpg_slices, patient_folders, rel_path
from camseg.data.prepare.ctich_labels import (
    JPG_CSV,
    NIFTI_CSV,
    SUBTYPES,
    CtIchSlice,
    DiagnosisRow,
    check_mask,
    mask_for,
    read_diagnosis_csv,
)
from camseg.data.prepare.windowing import CtWindow, apply_windows, parse_windows
from camseg.data.preprocess import display_slice
from camseg.data.progress import progress as progress_of
from camseg.errors import DatasetError
from camseg.optional import import_optional
from camseg.utils.io import save_png_atomic

if TYPE_CHECKING:
    import nibabel as nib

DEFAULT_WINDOWS = "brain,subdural,bone"
_NIFTI_NAME = re.compile(r"^(\d+)\.nii(\.gz)?$")


def detect_layout(src: Path, layout: str = "auto") -> tuple[Path, str]:
    """Find the release folder under ``src`` and its layout ('nifti' or 'jpg')."""
    require_source_dir(src, "point SRC at the unzipped CT-ICH release")
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


def _load_mask(
    mask_path: Path | None,
    ct_img: nib.Nifti1Image,
    ct: np.ndarray,
    ct_path: Path,
    pid: str,
    issues: list[Issue],
) -> np.ndarray | None:
    """The patient's binary mask reoriented like the CT, or None (reported) when it has none."""
    if mask_path is None:
        issues.append(
            Issue(
                "missing_mask",
                pid,
                None,
                f"masks/{ct_path.name}",
                "no mask file for this CT volume; its slices are written without masks",
            )
        )
        return None
    m_img, m = _load_volume(mask_path)
    if m.shape != ct.shape:
        raise DatasetError(
            f"{mask_path}: mask shape {m.shape} differs from CT {ct_path.name} shape {ct.shape}; "
            "re-download the mask"
        )
    if not np.allclose(m_img.affine, ct_img.affine, atol=1e-3):
        issues.append(
            Issue(
                "mask_affine_differs",
                pid,
                None,
                mask_path.name,
                "mask affine differs from the CT's; the mask is used voxel-aligned with the CT",
            )
        )
    return _canonical(ct_img, (m > 0).astype(np.uint8), mask_path)[0]


def _iter_nifti(
    root: Path,
    rows: dict[tuple[int, int], DiagnosisRow],
    patients: list[int],
    windows: tuple[CtWindow, ...],
    issues: list[Issue],
    progress: bool,
) -> Iterator[CtIchSlice]:
    cts = _nifti_files(root / "ct_scans")
    masks = _nifti_files(root / "masks")
    for patient in progress_of(patients, desc="ct-ich", unit="patient", enabled=progress):
        pid = f"{patient:03d}"
        ct_path = cts[patient]
        ct_img, ct = _load_volume(ct_path)
        ct_can, z_flipped = _canonical(ct_img, ct, ct_path)
        mask_can = _load_mask(masks.get(patient), ct_img, ct, ct_path, pid, issues)
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
            yield CtIchSlice(patient, row, image, mask)


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
    check_first_n(patients)
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
    volumes = _nifti_files(root / "ct_scans") if layout == "nifti" else patient_folders(root)
    where = "ct_scans" if layout == "nifti" else "Patients_CT"
    selected = _select_patients(root, rows, volumes, where, csv_name, issues)[:patients]

    classes = [s.lower() for s in SUBTYPES] if subtypes else ["hemorrhage"]
    with conversion("ct-ich", out, strict=strict, progress=progress, issues=issues) as conv:
        slices = (
            _iter_nifti(root, rows, selected, wins, conv.issues, progress)
            if layout == "nifti"
            else iter_jpg_slices(root, rows, selected, volumes, conv.issues, progress)
        )
        for sl in slices:
            conv.rows.append(_write_slice(conv.stage, sl, subtypes, csv_name, conv.issues))
        conv.finish(
            header=["image", "mask", "group", "slice", *classes],
            classes=classes,
            readme=lambda: _readme(layout, wins, subtypes, conv.rows, classes, conv.issues),
            positives_fix="convert more patients (--patients) or drop --subtypes",
        )
    return out


def _write_slice(
    stage: Path, sl: CtIchSlice, subtypes: bool, csv_name: str, issues: list[Issue]
) -> list[object]:
    """Check one slice's mask, write its image (and mask) PNGs; return its labels.csv row."""
    check_mask(sl, issues, csv_name)
    name = f"{sl.patient:03d}_{sl.row.slice:03d}.png"
    save_png_atomic(stage / "images" / name, np.ascontiguousarray(sl.image))
    mask = mask_for(sl, subtypes)
    if mask is not None:
        save_png_atomic(stage / "masks" / name, np.ascontiguousarray(mask))
    labels = list(sl.row.subtypes) if subtypes else [sl.row.hemorrhage]
    mask_path = f"masks/{name}" if mask is not None else ""
    return [f"images/{name}", mask_path, f"{sl.patient:03d}", sl.row.slice, *labels]


def _select_patients(
    root: Path,
    rows: dict[tuple[int, int], DiagnosisRow],
    volumes: dict[int, Path],
    where: str,
    csv_name: str,
    issues: list[Issue],
) -> list[int]:
    """Patients with both a volume and CSV rows, sorted; the others are reported."""
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
                rel_path(volumes[p], root),
                f"volume has no rows in {csv_name}; not converted",
            )
        )
    selected = sorted(set(volumes) & csv_patients)
    return selected


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
        f"{issues_note(issues)}"
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_converter_parser(
        subparsers,
        "ct-ich",
        help="PhysioNet CT-ICH (NIfTI or JPG release) -> camseg folder format",
        description="Convert PhysioNet CT-ICH v1.3.1 to the camseg folder format (one PNG per slice).",
        src_help="unzipped CT-ICH release folder",
    )
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
    p.set_defaults(func=cli_runner(convert_ct_ich, "windows", "subtypes", "layout", "patients"))
