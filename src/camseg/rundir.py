"""The run directory: fixed names under ``${paths.runs_dir}/${run_name}`` (see docs/design.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from camseg.errors import CamsegError


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

    @property
    def cls_last(self) -> Path:
        return self.cls / "checkpoints" / "last.ckpt"

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
    def seg_best(self) -> Path:
        return self.seg / "checkpoints" / "best.ckpt"

    @property
    def seg_last(self) -> Path:
        return self.seg / "checkpoints" / "last.ckpt"

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
