"""``<stage dir>/fingerprint.json``: the config keys and the input artifacts that shaped a stage.

A finished stage is reused only when the fingerprint of the current config and inputs
equals the recorded one; otherwise it is refused in one line that names the changed keys
and offers ``force=true`` (camseg never discards a trained model unasked). Which keys count
for which stage (:data:`camseg.fingerprint.keys.SCOPES`), and when a fingerprint is written: docs/design.md,
"Which keys a fingerprint holds".
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf

from camseg.errors import CamsegError
from camseg.fingerprint.keys import (
    CONTINUABLE,
    NEUTRAL,
    flatten,
    migrate,
    plain_json,
    stage_config,
)
from camseg.utils.io import read_json, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

FILENAME = "fingerprint.json"
VERSION = 1

# Input names, as they appear in fingerprint.json and in messages.
LABELS = "labels.csv"
CLS_CHECKPOINT = "cls/checkpoints/best.ckpt"
MANIFEST = "pseudo/manifest.json"
# The stage that produces an input: a changed input means that stage was redone.
PRODUCED_BY = {CLS_CHECKPOINT: "cls", MANIFEST: "pseudo"}


class _Absent:
    def __repr__(self) -> str:
        return "(unset)"


ABSENT: Any = _Absent()


class Change(NamedTuple):
    key: str
    old: Any  # ABSENT where the key is new
    new: Any  # ABSENT where the key is gone


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """Changed, added and removed keys of two (possibly nested) mappings, sorted by key."""
    a, b = flatten(plain_json(old)), flatten(plain_json(new))
    for k, v in NEUTRAL.items():
        if (k in a) != (k in b) and a.get(k, b.get(k)) == v:
            a.pop(k, None)
            b.pop(k, None)
    return [
        Change(k, a.get(k, ABSENT), b.get(k, ABSENT))
        for k in sorted(a.keys() | b.keys())
        if a.get(k, ABSENT) != b.get(k, ABSENT)
    ]


def _show(value: Any, digest: bool = False) -> str:
    if value is ABSENT:
        return "(unset)"
    if value is None:
        return "(missing)" if digest else "null"
    if digest:
        return f"{str(value)[:12]}…"
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:39] + "…"


def describe(changes: list[Change], limit: int = 4, digests: bool = False) -> str:
    """``"model.max_epochs: 1 -> 2, seed: 42 -> 7 and 3 more"``."""
    shown = [
        f"{c.key}: {_show(c.old, digests)} -> {_show(c.new, digests)}" for c in changes[:limit]
    ]
    more = len(changes) - limit
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


@dataclass(frozen=True)
class Fingerprint:
    """What shaped one stage: its config keys (flattened, resolved) and input digests."""

    stage: str
    config: dict[str, Any]
    inputs: dict[str, str | None]
    # Training stages: False from the start of training until it finishes. None: stage 2,
    # whose manifest says whether it is finished.
    finished: bool | None = None

    def to_json(self) -> dict[str, Any]:
        from camseg import __version__

        out: dict[str, Any] = {
            "fingerprint_version": VERSION,
            "stage": self.stage,
            "camseg_version": __version__,
        }
        if self.finished is not None:
            out["finished"] = self.finished
        return {**out, "inputs": self.inputs, "config": self.config}


def compute(stage: str, cfg: DictConfig, inputs: Mapping[str, str | None]) -> Fingerprint:
    return Fingerprint(stage, stage_config(stage, cfg), dict(inputs))


def labels_digest(data_root: str | Path) -> str | None:
    """sha256 of the dataset's ``labels.csv`` (None where there is none)."""
    path = Path(data_root) / "labels.csv"
    return sha256_file(path) if path.is_file() else None


# Manifest fields that say where and by which version, not what: a moved dataset or run
# directory, or a rerun of the finished stage 2 by another camseg, keeps its digest. The audit's
# shortcut warning is about the classifier, not the masks: a redone audit does not stale stage 3.
_MANIFEST_VOLATILE = (
    ("dataset", "root"),
    ("camseg_version",),
    ("run_name",),
    ("audit_shortcut",),
)


def manifest_digest(path: Path) -> str | None:
    """sha256 of the manifest's content (sorted keys) without where-it-lives fields; None if absent."""
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return sha256_file(path)  # unreadable: any change of its bytes is a change
    if isinstance(data, dict):
        for field_path in _MANIFEST_VOLATILE:
            parent: Any = data
            for part in field_path[:-1]:
                parent = parent.get(part) if isinstance(parent, dict) else None
            if isinstance(parent, dict):
                parent.pop(field_path[-1], None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seg_inputs(cfg: DictConfig, manifest: Path) -> dict[str, str | None]:
    """The input digests of stage 3: the dataset's labels and the manifest it trains on."""
    root = OmegaConf.select(cfg, "data.root", default=None, throw_on_missing=False)
    return {
        LABELS: None if root in (None, "???") else labels_digest(str(root)),
        MANIFEST: manifest_digest(manifest),
    }


def check_upstream_complete(manifest: Path, stage_dir: Path) -> None:
    """Refuse to reuse the finished ``stage_dir`` (stage 3) while stage 2 is half-built:
    its manifest is missing, or a mask the manifest lists is gone."""
    why = None
    if not manifest.is_file():
        why = f"{manifest} not found"
    else:
        try:
            samples = read_json(manifest).get("samples", [])
            for s in samples:
                if not (manifest.parent / s["mask"]).is_file():
                    why = f"mask {s['mask']} of sample '{s['id']}' is missing"
                    break
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            why = f"{manifest} is unreadable ({type(e).__name__})"
    if why is not None:
        raise CamsegError(
            f"{stage_dir}: stage pseudo is not complete ({why}), so the finished segmenter cannot "
            "be checked against its pseudo-masks; finish stage pseudo first (stages=[pseudo,seg])"
        )


def stale_inputs(stage_dir: Path, current: Mapping[str, str | None]) -> str | None:
    """Why a finished stage no longer matches its upstream (for report.md), or None.

    ``current``: digests of the inputs as they are now, e.g. ``{MANIFEST: ...}``.
    """
    try:
        recorded = read(stage_dir)
    except CamsegError:
        return None
    if recorded is None:
        return None
    changed = [k for k, v in current.items() if k in recorded.inputs and recorded.inputs[k] != v]
    if not changed:
        return None
    redone = [f"stage {PRODUCED_BY[k]} was redone since" for k in changed if k in PRODUCED_BY]
    return f"made from an earlier {', '.join(changed)}" + (
        f" ({', '.join(redone)})" if redone else ""
    )


def read(stage_dir: Path) -> Fingerprint | None:
    """The recorded fingerprint of ``stage_dir``, or None where there is none."""
    path = stage_dir / FILENAME
    if not path.is_file():
        return None
    try:
        data = read_json(path)
        finished = data.get("finished")
        return Fingerprint(
            str(data["stage"]),
            migrate(data["config"]),
            dict(data["inputs"]),
            None if finished is None else bool(finished),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CamsegError(
            f"{path}: unreadable ({type(e).__name__}: {e}); force=true redoes the stage, or use another run_name"
        ) from None


def write(stage_dir: Path, fp: Fingerprint) -> None:
    """Record ``fp`` (rank 0 only under DDP; atomic)."""
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:  # type: ignore[attr-defined]
        write_json_atomic(stage_dir / FILENAME, fp.to_json())


def begin(stage_dir: Path, fp: Fingerprint, *done_markers: Path) -> None:
    """Before a stage (re)trains: drop its done markers and record ``fp`` as unfinished
    (rank 0 only), so that a run killed half-way is resumed, not taken for the finished
    one it replaces, and is resumed only with the settings it was started with."""
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:  # type: ignore[attr-defined]
        for path in done_markers:
            path.unlink(missing_ok=True)
        write_json_atomic(stage_dir / FILENAME, replace(fp, finished=False).to_json())


_REDO = {
    "cls": "retrains the classifier",
    "audit": "audits the classifier again",
    "pseudo": "rebuilds the pseudo-masks",
    "seg": "retrains the segmenter",
}


def _longer_training(stage: str, config: list[Change]) -> bool:
    """Only more epochs were asked for (the scheduler's horizon follows them)."""
    keys = CONTINUABLE.get(stage, set())
    epochs = [c for c in config if c.key.endswith(".max_epochs")]
    return (
        bool(epochs)
        and all(c.key in keys for c in config)
        and all(isinstance(c.old, int) and isinstance(c.new, int) and c.new > c.old for c in epochs)
    )


def mismatch_message(
    stage_dir: Path, recorded: Fingerprint, current: Fingerprint, interrupted: bool = False
) -> str | None:
    """The one-line refusal for a stage made with other settings or inputs; None if equal.

    ``interrupted``: the stage's training was started with ``recorded`` and not finished.
    """
    inputs = diff(recorded.inputs, current.inputs)
    config = diff(recorded.config, current.config)
    if not inputs and not config:
        return None
    what = " and ".join(
        w for w, changed in (("other settings", config), ("other inputs", inputs)) if changed
    )
    parts = [describe(inputs, digests=True)] if inputs else []
    if config:
        parts.append(describe(config, limit=max(1, 4 - len(inputs))))
    reasons = [
        f"stage {PRODUCED_BY[c.key]} was redone since" for c in inputs if c.key in PRODUCED_BY
    ]
    if any(c.key == LABELS for c in inputs):
        reasons.append("the dataset's labels.csv changed")
    if interrupted:
        fixes = ["force=true starts over", "ckpt_path=last resumes it with the new ones"]
    else:
        fixes = [f"force=true {_REDO.get(current.stage, 'redoes it')}"]
        if not inputs and _longer_training(current.stage, config):
            fixes.append("ckpt_path=last continues its training")
    fixes.append("or use another run_name")
    reason = "; ".join(reasons) + "; " if reasons else ""
    made = "its interrupted run was started" if interrupted else "made"
    return f"{stage_dir}: {made} with {what} ({'; '.join(parts)}); {reason}{', '.join(fixes)}"


def check(
    stage_dir: Path, current: Fingerprint, legacy_inputs: Mapping[str, str | None] | None = None
) -> bool:
    """Refuse a stage whose recorded fingerprint differs from ``current``.

    Returns True when the recorded one matches, False (after one warning) for a stage made
    before camseg recorded fingerprints, which is then reused as it is; ``legacy_inputs``
    (input digests such a stage recorded elsewhere, e.g. in its manifest) are still
    compared. Raises :class:`CamsegError` naming the changed keys otherwise.
    """
    recorded = read(stage_dir)
    if recorded is not None and recorded.finished is False:
        raise CamsegError(
            f"{stage_dir / FILENAME}: says the stage did not finish, yet its results are there; "
            "force=true redoes it, or use another run_name"
        )
    if recorded is None:
        if legacy_inputs:
            known = {k: current.inputs.get(k) for k in legacy_inputs}
            old = Fingerprint(current.stage, current.config, dict(legacy_inputs))
            message = mismatch_message(stage_dir, old, replace(current, inputs=known))
            if message is not None:
                raise CamsegError(message)
        log.warning(
            "stage %s: %s has no %s (made before camseg recorded fingerprints), so a changed "
            "config or input cannot be detected; it is reused as it is (force=true redoes it)",
            current.stage,
            stage_dir,
            FILENAME,
        )
        return False
    message = mismatch_message(stage_dir, recorded, current)
    if message is not None:
        raise CamsegError(message)
    return True


def check_interrupted(stage_dir: Path, current: Fingerprint) -> None:
    """Before resuming an interrupted training: refuse one started with other settings or
    inputs (its checkpoint would continue under the new ones, and record them)."""
    recorded = read(stage_dir)
    if recorded is None or recorded.finished is not False:
        return  # started before camseg recorded fingerprints: resumed as before
    message = mismatch_message(stage_dir, recorded, current, interrupted=True)
    if message is not None:
        raise CamsegError(message)
