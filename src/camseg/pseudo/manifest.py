"""``pseudo/manifest.json``: what stage 3 trains on, and where it came from.

Stage 3 reads only the manifest. It refuses one whose schema is unknown, whose
classifier checkpoint hash differs from the checkpoint now in the run directory, whose
dataset differs from the configured one, or whose mask files are missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from camseg.constants import MANIFEST_SCHEMA_VERSION
from camseg.errors import ManifestError
from camseg.utils.io import sha256_file

REQUIRED = ("schema_version", "camseg_version", "classifier", "cam", "policy", "dataset", "samples")
SAMPLE_FIELDS = ("id", "image", "mask", "labels", "fg_fraction")


@dataclass(frozen=True)
class Manifest:
    path: Path
    data: dict[str, Any]

    @property
    def root(self) -> Path:
        """The pseudo/ directory (mask paths are relative to it)."""
        return self.path.parent

    @property
    def samples(self) -> list[dict[str, Any]]:
        return self.data["samples"]

    @property
    def classes(self) -> list[str]:
        return list(self.data["dataset"]["classes"])

    def mask_paths(self) -> dict[str, Path]:
        return {s["id"]: self.root / s["mask"] for s in self.samples}


def _read_validated(path: Path) -> dict[str, Any]:
    """Read the manifest JSON and check its fields, schema version and sample entries."""
    if not path.is_file():
        raise ManifestError(
            f"{path} not found: run stage 'pseudo' first (camseg stages=[pseudo] run_name=...)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ManifestError(
            f"{path}: not valid JSON ({e}); re-run stage pseudo with force=true"
        ) from None
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ManifestError(
            f"{path}: missing field(s) {missing}; re-run stage pseudo with force=true"
        )
    if data["schema_version"] != MANIFEST_SCHEMA_VERSION:
        raise ManifestError(
            f"{path}: schema_version {data['schema_version']} is not the supported {MANIFEST_SCHEMA_VERSION}; "
            "re-run stage pseudo with this camseg version"
        )
    for i, s in enumerate(data["samples"]):
        lack = [f for f in SAMPLE_FIELDS if f not in s]
        if lack:
            raise ManifestError(f"{path}: samples[{i}] lacks {lack}")
    return data


def _check_sources(
    path: Path, data: dict[str, Any], checkpoint: Path | None, dataset_root: Path | None
) -> None:
    """Refuse a manifest made from another classifier checkpoint or another dataset."""
    if checkpoint is not None:
        recorded = data["classifier"].get("sha256")
        if not checkpoint.is_file():
            raise ManifestError(
                f"{path}: its classifier checkpoint {checkpoint} is gone; re-run stages cls and pseudo"
            )
        actual = sha256_file(checkpoint)
        if recorded != actual:
            raise ManifestError(
                f"{path}: made from a classifier checkpoint with sha256 {str(recorded)[:12]}…, but {checkpoint} now has "
                f"{actual[:12]}…; re-run stage pseudo (force=true) on the current checkpoint"
            )
    if dataset_root is not None:
        labels = Path(dataset_root) / "labels.csv"
        recorded = data["dataset"].get("labels_sha256")
        if not labels.is_file() or sha256_file(labels) != recorded:
            raise ManifestError(
                f"{path}: pseudo-labels are of dataset {data['dataset']['root']} (labels.csv sha256 {str(recorded)[:12]}…), "
                f"not of data.root={dataset_root}; use the same data config or re-run stage pseudo"
            )


def load_manifest(
    path: Path,
    checkpoint: Path | None = None,
    dataset_root: Path | None = None,
    classes: list[str] | None = None,
    check_files: bool = True,
) -> Manifest:
    """Read and validate a manifest.

    Args:
        path: ``pseudo/manifest.json``.
        checkpoint: the classifier checkpoint expected to have produced it (hash compared).
        dataset_root: the dataset root expected (compared after resolving).
        classes: the class names expected.
        check_files: every listed mask file must exist.
    """
    data = _read_validated(path)
    m = Manifest(path, data)
    _check_sources(path, data, checkpoint, dataset_root)
    if classes is not None and m.classes != list(classes):
        raise ManifestError(
            f"{path}: classes {m.classes} differ from the dataset's {list(classes)}"
        )
    if check_files:
        for s in m.samples:
            p = m.root / s["mask"]
            if not p.is_file():
                raise ManifestError(
                    f"{path}: mask {p} of sample '{s['id']}' is missing; re-run stage pseudo to complete it"
                )
    return m
