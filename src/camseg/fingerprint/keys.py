"""Which config keys shape which stage, and the keys renamed or declared since a
fingerprint was recorded (the policy: docs/design.md, "Which keys a fingerprint holds")."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

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
            "pseudo.on_shortcut",  # what to do about the audit's verdict, not how masks are made
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
CONTINUABLE = {
    "cls": {"model.max_epochs", "model.scheduler.T_max"},
    "seg": {"seg.max_epochs", "seg.scheduler.T_max"},
}


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


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


def plain_json(obj: Any) -> Any:
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


def stage_config(stage: str, cfg: DictConfig) -> dict[str, Any]:
    """The resolved, flattened config keys that shape ``stage`` (see :data:`SCOPES`)."""
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
    return {k: v for k, v in flatten(plain_json(tree)).items() if k in scope}
