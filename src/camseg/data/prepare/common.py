"""Pieces every converter shares: the staged output folder, labels.csv, the issue report, the CLI.

A converter never writes into its final folder directly: it fills a hidden sibling
folder, validates it with :func:`camseg.data.folder.validate_root`, and renames it onto
``--out`` in one step, so an interrupted conversion leaves either nothing or the old
folder, never half a dataset. :func:`conversion` does all of that around a converter's own
reading, so each converter only reads its source and appends rows and issues.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import secrets
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from camseg.data.folder import LABELS_CSV, validate_root
from camseg.errors import ConfigError, DatasetError
from camseg.utils.io import remove_path, write_text_atomic

REPORT_CSV = "conversion_report.csv"
REPORT_COLUMNS = ("kind", "patient", "slice", "file", "detail")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class Issue:
    """One inconsistency found in a source dataset (a row of ``conversion_report.csv``).

    Attributes:
        kind: short machine-readable tag, e.g. ``label_without_mask``.
        patient: patient / scan / image id the issue belongs to.
        slice: slice number within the patient, or None.
        file: source file the issue was found in ('' when none).
        detail: one human sentence: what was found and what the converter did about it.
    """

    kind: str
    patient: str
    slice: int | None
    file: str
    detail: str

    def one_line(self) -> str:
        where = self.patient if self.slice is None else f"{self.patient} slice {self.slice}"
        return f"{where}: {self.detail}"


def check_out_dir(out: Path, src: Path, overwrite: bool) -> Path:
    """Refuse an ``--out`` that would destroy data; return it as an absolute path."""
    out = Path(os.path.abspath(out))
    src_abs = Path(os.path.abspath(src))
    if out == src_abs or out.is_relative_to(src_abs) or src_abs.is_relative_to(out):
        raise DatasetError(
            f"{out}: --out overlaps the source folder {src_abs}; write the converted dataset elsewhere"
        )
    if out.exists():
        if not out.is_dir():
            raise DatasetError(f"{out}: exists and is not a folder; choose another --out")
        if any(out.iterdir()) and not overwrite:
            raise DatasetError(
                f"{out}: folder is not empty; choose an empty --out or pass --overwrite to replace it"
            )
    return out


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield a hidden sibling folder of ``out``; on success it replaces ``out`` in one rename.

    On any exception (Ctrl-C included) the staging folder is removed and ``out`` is left as
    it was. Call :func:`check_out_dir` first: this function replaces ``out`` unconditionally.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    # A plain mkdir (not mkdtemp) so the folder gets the user's umask, not mode 0700.
    stage = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        remove_path(stage, out.parent, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.{secrets.token_hex(4)}.old"
        os.replace(out, old)
        os.replace(stage, out)
        remove_path(old, out.parent, ignore_errors=True)
    else:
        os.replace(stage, out)


def csv_text(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def write_labels(root: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    write_text_atomic(root / LABELS_CSV, csv_text(header, rows))


def require_positives(
    classes: Sequence[str], header: Sequence[str], rows: Sequence[Sequence[object]], fix: str
) -> None:
    """Fail early, with a converter-specific fix, on a class no row shows.

    ``validate_root`` would refuse such a dataset too, but its message cannot say which
    converter option to change.
    """
    if not rows:
        raise DatasetError(f"the conversion produced no samples; {fix}")
    for c in classes:
        col = header.index(c)
        if not any(int(r[col]) == 1 for r in rows):  # type: ignore[call-overload]
            raise DatasetError(f"no converted sample shows class '{c}'; {fix}")


def write_report(path: Path, issues: Sequence[Issue]) -> None:
    rows = [(i.kind, i.patient, i.slice, i.file, i.detail) for i in issues]
    write_text_atomic(path, csv_text(REPORT_COLUMNS, rows))


def summarize_issues(issues: Sequence[Issue]) -> str:
    counts = Counter(i.kind for i in issues)
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))


def raise_if_strict(issues: Sequence[Issue], out: Path, name: str) -> None:
    """Under ``--strict``: write the report beside ``out`` and stop with one line."""
    if not issues:
        return
    path = out.parent / f"{out.name}.{REPORT_CSV}"
    write_report(path, issues)
    raise DatasetError(
        f"{name}: {len(issues)} inconsistencies ({summarize_issues(issues)}), "
        f"first: {issues[0].one_line()}; all listed in {path}; "
        "fix the source or drop --strict to convert and keep them reported"
    )


def finish(
    stage: Path,
    *,
    header: Sequence[str],
    rows: Sequence[Sequence[object]],
    classes: Sequence[str],
    issues: Sequence[Issue],
    readme: str,
    positives_fix: str,
) -> None:
    """Write labels.csv, README.md and the report into ``stage`` and validate it."""
    require_positives(classes, header, rows, positives_fix)
    write_labels(stage, header, rows)
    write_text_atomic(stage / "README.md", readme)
    if issues:
        write_report(stage / REPORT_CSV, issues)
    try:
        validate_root(stage, classes=list(classes))
    except DatasetError as e:
        raise DatasetError(
            f"the converted dataset failed validation ({e}); please report this bug"
        ) from None


def print_summary(
    name: str, out: Path, rows: Sequence[Sequence[object]], issues: Sequence[Issue]
) -> None:
    line = f"{name}: wrote {len(rows)} samples to {out}"
    if issues:
        line += (
            f"; {len(issues)} inconsistencies ({summarize_issues(issues)}) listed in "
            f"{out / REPORT_CSV}"
        )
    else:
        line += "; no inconsistencies found"
    print(line)


def add_output_options(
    p: argparse.ArgumentParser | argparse._ArgumentGroup, strict: bool = True
) -> None:
    """The options every converter shares: --strict (if it reports issues), --overwrite, --no-progress."""
    if strict:
        p.add_argument(
            "--strict",
            action="store_true",
            help="fail on any inconsistency instead of reporting it",
        )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress output and no summary line"
    )


def require_source_dir(src: Path, hint: str) -> Path:
    """``src`` as a Path; a one-line error ending in ``hint`` when it is not a folder."""
    src = Path(src)
    if not src.is_dir():
        raise DatasetError(f"{src}: source folder not found; {hint}")
    return src


def check_first_n(value: int | None, unit: str = "patients") -> None:
    """Refuse a ``--patients N`` that is not a positive number."""
    if value is not None and value < 1:
        raise ConfigError(f"--patients is {value}; give a positive number of {unit}")


def issues_note(issues: Sequence[Issue], label: str = "inconsistencies in the source") -> str:
    """The README line that counts the source's inconsistencies."""
    return f"- {label}: {len(issues)}{' (see conversion_report.csv)' if issues else ''}\n"


@dataclass
class Conversion:
    """A conversion in progress: the staging folder, and the rows and issues found so far.

    Attributes:
        name: the subcommand, used in messages (``ct-ich``).
        out: the final folder.
        stage: the hidden folder the converter writes into.
        strict: raise on any issue instead of reporting it.
        rows: labels.csv rows, appended by the converter.
        issues: inconsistencies, appended by the converter.
        finished: set by :meth:`finish`; a conversion left unfinished is a bug.
    """

    name: str
    out: Path
    stage: Path
    strict: bool
    rows: list[list[object]] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    finished: bool = False

    def check_strict(self) -> None:
        """Under ``strict``: stop now if an issue was found (long converters call it early)."""
        if self.strict:
            raise_if_strict(self.issues, self.out, self.name)

    def finish(
        self,
        *,
        header: Sequence[str],
        classes: Sequence[str],
        readme: Callable[[], str],
        positives_fix: str,
    ) -> None:
        """Close the conversion: the strict check, labels.csv, README.md, the report, validation."""
        self.check_strict()
        finish(
            self.stage,
            header=header,
            rows=self.rows,
            classes=classes,
            issues=self.issues,
            readme=readme(),
            positives_fix=positives_fix,
        )
        self.finished = True


@contextmanager
def conversion(
    name: str,
    out: Path,
    *,
    strict: bool = False,
    progress: bool = True,
    issues: Iterable[Issue] = (),
) -> Iterator[Conversion]:
    """Stage a conversion into ``out``; the body reads the source and calls ``finish``.

    On success the staging folder replaces ``out`` and, with ``progress``, a one-line summary
    is printed. Call :func:`check_out_dir` first.
    """
    with staged_output(out) as stage:
        conv = Conversion(name, out, stage, strict, issues=list(issues))
        yield conv
        if not conv.finished:
            raise RuntimeError(
                f"{name}: the converter did not call finish(); please report this bug"
            )
    if progress:
        print_summary(name, out, conv.rows, conv.issues)


def add_converter_parser(
    subparsers: argparse._SubParsersAction,
    name: str,
    *,
    help: str,
    description: str,
    src_help: str,
    strict: bool = True,
) -> argparse.ArgumentParser:
    """A subcommand with ``SRC``, ``--out`` and the output options; add its own options after."""
    p = subparsers.add_parser(name, help=help, description=description)
    p.add_argument("src", type=Path, metavar="SRC", help=src_help)
    p.add_argument("--out", type=Path, required=True, help="destination dataset root")
    add_output_options(p.add_argument_group("output"), strict=strict)
    return p


def cli_runner(
    convert: Callable[..., Path], *names: str, **renamed: str
) -> Callable[[argparse.Namespace], int]:
    """The ``func`` of a subcommand: ``convert(SRC, --out, **options)``; returns exit status 0.

    Args:
        convert: the converter function.
        names: options passed under their own name.
        renamed: ``keyword="dest"``: options whose argparse dest differs from the keyword.
    """

    def run(args: argparse.Namespace) -> int:
        kwargs = {n: getattr(args, n) for n in names}
        kwargs.update({k: getattr(args, dest) for k, dest in renamed.items()})
        if hasattr(args, "strict"):
            kwargs["strict"] = args.strict
        convert(
            args.src, args.out, overwrite=args.overwrite, progress=not args.no_progress, **kwargs
        )
        return 0

    return run
