"""The run directory: fixed names under ``${paths.runs_dir}/${run_name}`` (see docs/design.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from camseg.errors import CamsegError, ConfigError


def check_run_name(value: Any) -> str:
    """``run_name`` as one safe folder name under ``paths.runs_dir``, or a one-line ConfigError.

    No separators, no ``..``, nothing that starts with ``.`` or ``-``, no control characters:
    the run directory then always sits directly under ``paths.runs_dir``, so ``force=true``
    never deletes anything outside it.
    """
    name = "" if value is None else str(value)
    if not name.strip():
        raise ConfigError("run_name is empty; give each experiment a name (run_name=my_experiment)")
    bad = (
        "/" in name
        or "\\" in name
        or name.startswith((".", "-"))
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
    )
    if bad:
        raise ConfigError(
            f"run_name={name!r}: must be a single folder name under paths.runs_dir "
            "(no '/', '\\' or '..', not starting with '.' or '-', no control characters), "
            "e.g. run_name=my_experiment"
        )
    return name


def check_output_subdir(value: Any) -> str | None:
    """``output_subdir`` as a relative path inside the run directory (no ``..``), or None."""
    if value is None or str(value) == "":
        return None
    sub = str(value)
    p = PurePosixPath(sub)
    if (
        p.is_absolute()
        or "\\" in sub
        or ".." in p.parts
        or (len(sub) > 1 and sub[1] == ":")
        or any(ord(c) < 32 or ord(c) == 127 for c in sub)
    ):
        raise ConfigError(
            f"output_subdir={sub!r}: must be a relative path inside the run directory "
            "(no leading '/', no '..', no '\\'), e.g. output_subdir=ablations/no_crf"
        )
    return sub


@dataclass(frozen=True)
class RunDir:
    """Paths of one experiment's artifacts.

    ``cls_dir`` points stage 1 elsewhere: sweep trials over stages 2-3 write under a trial
    directory but reuse the classifier of the run they sweep.
    """

    root: Path
    cls_dir: Path | None = None

    @property
    def name(self) -> str:
        return self.root.name

    def stage(self, stage: str) -> Path:
        return self.root / stage

    # stage 1
    @property
    def cls(self) -> Path:
        return self.cls_dir if self.cls_dir is not None else self.root / "cls"

    @property
    def cls_best(self) -> Path:
        return self.cls / "checkpoints" / "best.ckpt"

    # stage 2
    @property
    def pseudo(self) -> Path:
        return self.root / "pseudo"

    @property
    def manifest(self) -> Path:
        return self.pseudo / "manifest.json"

    # stage 3
    @property
    def seg(self) -> Path:
        return self.root / "seg"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    def require(self, path: Path, produced_by: str) -> Path:
        """Return ``path`` or fail with how to produce it."""
        if not path.exists():
            raise CamsegError(
                f"{path} not found: run stage '{produced_by}' first "
                f"(camseg stages=[{produced_by}] run_name={self.name}) or set run_name to an existing run"
            )
        return path
