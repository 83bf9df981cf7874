"""``<stage dir>/fingerprint.json``: the config keys and the input artifacts that shaped a stage.

A finished stage is reused only when the fingerprint of the current config and inputs
equals the recorded one; otherwise it is refused in one line that names the changed keys
and offers ``force=true`` (camseg never discards a trained model unasked).

Which keys count. A key is in a stage's fingerprint when changing it can change a
number, a weight or a mask that the stage writes. Left out are keys that change only
how fast, where or how visibly it runs: loader workers and memory pinning, evaluation
batch sizes, channels-last, Score-CAM's chunk size, the hardware (``trainer.accelerator``,
``devices``, ``num_nodes``, ``strategy``), determinism switches, logging, progress bars
and summaries, the number of overlay pictures, and where files live (``paths.*``,
``data.root``: the dataset is identified by the sha256 of its ``labels.csv`` instead, so
a moved dataset or run directory stays valid). Per stage:

* ``cls``: ``seed``, ``data.*``, ``model.*``, the training ``trainer.*`` keys
  (precision, clipping, accumulation, batch limits, ...), ``callbacks.early_stopping`` and
  ``callbacks.model_checkpoint``; input: ``labels.csv``.
* ``pseudo``: ``data.*`` but the training-only batch size and augmentations, ``cam.*``,
  ``pseudo.*``, ``trainer.precision`` and ``trainer.limit_predict_batches``; inputs:
  ``labels.csv`` and the classifier checkpoint. Stage 2 resumes sample by sample, so its
  fingerprint is written when it starts and checked on every rerun, finished or not.
* ``audit``: like ``pseudo`` with ``audit.*`` in place of ``pseudo.*`` (but its batch
  size), without ``data.predict_split``; inputs: ``labels.csv`` and the classifier
  checkpoint. A cheap measurement: when its fingerprint differs it is redone, not refused.
* ``seg``: like ``cls`` with ``seg.*`` in place of ``model.*``; inputs: ``labels.csv``
  and ``pseudo/manifest.json`` (its digest, see :func:`manifest_digest`).

``data.predict_split`` counts for stage 2 only; ``data.slice_channels`` counts through
``data.in_channels``, which is derived from it. Values are compared after
interpolations are resolved, so ``model.scheduler.T_max`` follows ``model.max_epochs``.

When. The training stages record their fingerprint as ``"finished": false`` when
training starts (removing ``metrics.json``) and as finished after ``metrics.json`` is
written, so an interrupted training is resumed only with the settings it was started
with. Only rank 0 writes. A stage made before fingerprints existed is reused with one
warning, and nothing is recorded for it until it is redone.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf

from camseg.errors import CamsegError
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

_WHERE_AND_HOW_FAST = (
    "data.root",
    "data.data_dir",  # where a synthetic dataset may be generated, not what it holds
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
    "data.prefetch_factor",
    "data.decode_cache_mb",
    "data.eval_batch_size",
    # Derived into data.in_channels, which counts (with data.context_slices).
    "data.slice_channels",
)
_TRAINER_RUNTIME = tuple(
    f"trainer.{k}"
    for k in (
        "_target_",
        "accelerator",
        "devices",
        "num_nodes",
        "strategy",
        "deterministic",
        "benchmark",
        "log_every_n_steps",
        "num_sanity_val_steps",
        "enable_progress_bar",
        "enable_model_summary",
        "enable_checkpointing",
        "default_root_dir",
        "profiler",
        "limit_predict_batches",
    )
)
_TRAINING = ("seed", "data", "trainer", "callbacks.early_stopping", "callbacks.model_checkpoint")


@dataclass(frozen=True)
class Scope:
    """Config keys of one stage: those under ``include`` but not under ``exclude``."""

    include: tuple[str, ...]
    exclude: tuple[str, ...] = field(default=())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and _under(key, self.include) and not _under(key, self.exclude)


SCOPES: dict[str, Scope] = {
    "cls": Scope(
        (*_TRAINING, "model"),
        (*_WHERE_AND_HOW_FAST, *_TRAINER_RUNTIME, "data.predict_split", "model.channels_last"),
    ),
    "pseudo": Scope(
        ("data", "cam", "pseudo", "trainer.precision", "trainer.limit_predict_batches"),
        (
            *_WHERE_AND_HOW_FAST,
            "data.batch_size",
            "data.train_transforms",
            "cam.scorecam_batch_size",
            "pseudo.batch_size",
            "pseudo.overlays",
            "pseudo.crf_workers",
        ),
    ),
    "audit": Scope(
        ("data", "cam", "audit", "trainer.precision", "trainer.limit_predict_batches"),
        (
            *_WHERE_AND_HOW_FAST,
            "data.batch_size",
            "data.train_transforms",
            "data.predict_split",
            "cam.scorecam_batch_size",
            "audit.batch_size",
        ),
    ),
    "seg": Scope(
        (*_TRAINING, "seg"),
        (
            *_WHERE_AND_HOW_FAST,
            *_TRAINER_RUNTIME,
            "data.predict_split",
            "seg.channels_last",
            "seg.overlays",
        ),
    ),
}

# Where a changed fingerprint is only a longer training, ckpt_path=last continues it.
_CONTINUABLE = {
    "cls": {"model.max_epochs", "model.scheduler.T_max"},
    "seg": {"seg.max_epochs", "seg.scheduler.T_max"},
}


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


class _Absent:
    def __repr__(self) -> str:
        return "(unset)"


ABSENT: Any = _Absent()


class Change(NamedTuple):
    key: str
    old: Any  # ABSENT where the key is new
    new: Any  # ABSENT where the key is gone


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and empty mappings are leaves."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _plain(obj: Any) -> Any:
    """JSON round trip: tuples become lists, so recorded and current values compare equal."""
    return json.loads(json.dumps(obj, default=str))


# Keys declared in (or moved out of) the config tree later, with the value that behaves as
# their absence did: a fingerprint recorded before still matches.
NEUTRAL: dict[str, Any] = {
    "cam.methods": [],
    "cam.fusion": "mean",
    "cam.weights": None,
    "seg.monitor_mode": "auto",
    "seg.skip_unlabelled": False,
    "data.windows": None,
    # issue 12: cross-validation folds, threshold rules, calibration (off by default)
    "data.cv_folds": 5,
    "data.cv_fold": None,
    "pseudo.threshold_rule": "absolute",
    "pseudo.calibrate": False,
    "pseudo.calibration.rules": ["absolute", "max_fraction", "mass_quantile"],
    "pseudo.calibration.fg_thresholds": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
    "pseudo.calibration.bg_thresholds": [0.05, 0.1, 0.2, 0.3],
    "pseudo.calibration.min_component_sizes": [0.0, 1.0e-4, 5.0e-4],
    "pseudo.calibration.crf_bg_powers": [0.25, 0.5, 1.0],
    "pseudo.calibration.max_missed_as_background": 0.05,
    # issue 16: stage 3's network and loss became partials (see MOVED)
    "seg.net._target_": "camseg.models.segmenter.build_segmentation_net",
    "seg.net._partial_": True,
    "seg.loss._target_": "camseg.seg.losses.build_loss",
    "seg.loss._partial_": True,
}

# Config keys that moved (old -> new; a key's children move with it). A recorded fingerprint
# is read with the new names, so a stage finished before the move still matches; the
# preflight refuses the old names in one line that gives the new ones.
MOVED: dict[str, str] = {
    "seg.arch": "seg.net.arch",
    "seg.encoder_name": "seg.net.encoder_name",
    "seg.encoder_weights": "seg.net.encoder_weights",
    "seg.model_kwargs": "seg.net.model_kwargs",
}


def moved_to(key: str) -> str | None:
    """The new name of ``key`` (or of a key under it) when it moved; None otherwise."""
    for old, new in MOVED.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old) :]
    return None


def migrate(config: Mapping[str, Any]) -> dict[str, Any]:
    """A recorded (flat) config with the keys that moved since under their new names."""
    return {moved_to(k) or k: v for k, v in config.items()}


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """Changed, added and removed keys of two (possibly nested) mappings, sorted by key."""
    a, b = flatten(_plain(old)), flatten(_plain(new))
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


def stage_config(stage: str, cfg: DictConfig) -> dict[str, Any]:
    """The resolved, flattened config keys that shape ``stage`` (see the module docstring)."""
    scope = SCOPES[stage]
    # Only the top-level nodes in scope are resolved: the rest may hold interpolations that
    # resolve only inside a running Hydra app.
    tree: dict[str, Any] = {}
    for top in {p.split(".", 1)[0] for p in scope.include}:
        node = cfg.get(top)
        tree[top] = (
            OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
            if OmegaConf.is_config(node)
            else node
        )
    return {k: v for k, v in flatten(_plain(tree)).items() if k in scope}


def compute(stage: str, cfg: DictConfig, inputs: Mapping[str, str | None]) -> Fingerprint:
    return Fingerprint(stage, stage_config(stage, cfg), dict(inputs))


def labels_digest(data_root: str | Path) -> str | None:
    """sha256 of the dataset's ``labels.csv`` (None where there is none)."""
    path = Path(data_root) / "labels.csv"
    return sha256_file(path) if path.is_file() else None


# Manifest fields that say where and by which version, not what: a moved dataset or run
# directory, or a rerun of the finished stage 2 by another camseg, keeps its digest.
_MANIFEST_VOLATILE = (("dataset", "root"), ("camseg_version",), ("run_name",))


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
    keys = _CONTINUABLE.get(stage, set())
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
