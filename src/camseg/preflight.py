"""Preflight: everything a run needs, checked before the first training step.

``check_config`` runs first (run name, types and ranges of the keys that would otherwise
fail late, after stage 1 has trained); ``check_data`` then decodes every image and mask
with the same code as ``camseg-data check``. Both raise one-line errors. The data check
is cached in the run directory by each file's size and mtime, so a rerun decodes nothing.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from camseg.data.folder import DatasetIndex, check_root
from camseg.errors import ConfigError
from camseg.fingerprint.keys import MOVED, moved_to
from camseg.resolvers import check_in_channels
from camseg.rundir import RunDir, check_output_subdir, check_run_name
from camseg.utils.io import read_json, write_json_atomic

log = logging.getLogger("camseg")

CACHE_NAME = "preflight.json"
CACHE_VERSION = 1


@dataclass(frozen=True)
class Rule:
    """A config key and what it may hold: an ``int`` or a ``float`` within bounds."""

    key: str
    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is refused (learning rates, scales)
    nullable: bool = False

    def allowed(self) -> str:
        """What the key must be: ``in [0, 1]``, ``an integer >= 1``, ``> 0``."""
        prefix = "an integer " if self.kind is int else ""
        if self.low is not None and self.high is not None:
            return f"{prefix}in [{_fmt(self.low)}, {_fmt(self.high)}]"
        if self.low is not None:
            return f"{prefix}{'>' if self.low_open else '>='} {_fmt(self.low)}"
        return prefix.strip() or "a number"


RULES: tuple[Rule, ...] = (
    Rule("data.batch_size", int, 1),
    Rule("data.eval_batch_size", int, 1, nullable=True),
    Rule("data.num_workers", int, 0),
    Rule("data.image_size", int, 1),
    # Before data.in_channels, which is derived from them.
    Rule("data.slice_channels", int, 1, nullable=True),
    Rule("data.context_slices", int, 0),
    Rule("data.in_channels", int, 1),
    Rule("data.val_fraction", float, 0, 1),
    Rule("data.test_fraction", float, 0, 1),
    Rule("model.max_epochs", int, 1),
    Rule("model.optimizer.lr", float, 0, low_open=True),
    Rule("model.optimizer.weight_decay", float, 0),
    Rule("cam.scorecam_batch_size", int, 1),
    Rule("pseudo.fg_threshold", float, 0, 1),
    Rule("pseudo.bg_threshold", float, 0, 1),
    Rule("pseudo.overlays", int, 0),
    Rule("pseudo.batch_size", int, 1, nullable=True),
    Rule("seg.batch_size", int, 1, nullable=True),
    Rule("seg.max_epochs", int, 1),
    Rule("seg.optimizer.lr", float, 0, low_open=True),
    Rule("seg.optimizer.weight_decay", float, 0),
    Rule("seg.rounds", int, 1),
    Rule("seg.self_training_confidence", float, 0, 1),
    Rule("seg.overlays", int, 0),
    Rule("cv.folds", int, 2),
    Rule("cv.fold", int, 0, nullable=True),
)
# Lists whose every element follows the rule (the key names the list).
LIST_RULES: tuple[Rule, ...] = (
    Rule("cam.scales", float, 0, low_open=True),
    Rule("pseudo.sweep_thresholds", float, 0, 1),
)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _number(value: Any, kind: type) -> float | int | None:
    """``value`` as ``kind`` (numeric strings accepted, booleans not), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, int | float):
        return None
    try:
        as_float = float(value)
    except OverflowError:  # an int beyond float range: no batch size or epoch count is that big
        return None
    if not math.isfinite(as_float):
        return None
    if kind is int:
        return int(value) if as_float.is_integer() else None
    return as_float


def _check_value(rule: Rule, key: str, value: Any) -> str | None:
    """One line naming the key, the value and the allowed range; None when ``value`` is fine."""
    if value is None:
        return None if rule.nullable else f"{key} is null; it must be {rule.allowed()}"
    x = _number(value, rule.kind)
    if x is None:
        kind = "an integer" if rule.kind is int else "a number"
        return f"{key}={value}: not {kind}; it must be {rule.allowed()}"
    too_low = rule.low is not None and (x <= rule.low if rule.low_open else x < rule.low)
    too_high = rule.high is not None and x > rule.high
    if too_low or too_high:
        return f"{key}={value}: must be {rule.allowed()}"
    return None


_ABSENT = object()


def _select(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
    except Exception as e:  # a missing value (???) or an interpolation that cannot resolve
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key}: cannot be read ({first}); set it, e.g. {key}=...") from None


def _moved(key: str, value: str | None) -> str | None:
    """``seg.arch is now seg.net.arch (seg.net.arch=FPN)`` when ``key`` moved, else None;
    ``value`` None: the key comes from a config file."""
    new = moved_to(key)
    if new is None:
        return None
    if value is None:
        return f"{key} (in a config file) is now {new}: move it there"
    return f"{key} is now {new} ({new}={value})"


def check_overrides(overrides: list[str]) -> None:
    """Refuse command-line overrides of keys that moved, naming the new spelling, before
    Hydra composes (whose own error would say only that the key is not in the config).

    Raises:
        ConfigError: ``seg.arch=FPN: seg.arch is now seg.net.arch (seg.net.arch=FPN)``.
    """
    errors = []
    for arg in overrides:
        key, eq, value = arg.lstrip("+~").partition("=")
        error = _moved(key.split("@")[0], value if eq else "...")
        if error:
            errors.append(f"{arg}: {error}")
    if errors:
        raise ConfigError("; ".join(errors))


def check_config(cfg: DictConfig) -> None:
    """Run name, output folder, and the types and ranges of the keys that fail late today.

    Raises:
        ConfigError: one line naming each bad key, its value and the allowed range.
    """
    check_run_name(cfg.get("run_name"))
    check_output_subdir(cfg.get("output_subdir"))
    if "data" in cfg and OmegaConf.is_missing(cfg.data, "root"):
        raise ConfigError(
            "data.root is not set; point it at a dataset root with labels.csv "
            "(data.root=/path/to/dataset), or use data=synthetic"
        )
    errors: list[str] = []
    for key in MOVED:  # set by a config file of the user's (overrides: check_overrides)
        if _select(cfg, key) is not _ABSENT:
            errors.append(_moved(key, None) or key)
    values: dict[str, Any] = {}
    for rule in RULES:
        value = _select(cfg, rule.key)
        if value is _ABSENT:
            continue
        error = _check_value(rule, rule.key, value)
        if error:
            errors.append(error)
        else:
            values[rule.key] = value
    for rule in LIST_RULES:
        value = _select(cfg, rule.key)
        if value is _ABSENT or value is None:
            continue
        if not OmegaConf.is_list(value) or len(value) == 0:
            errors.append(
                f"{rule.key}={value}: must be a non-empty list, each value {rule.allowed()}"
            )
            continue
        for j, item in enumerate(value):
            error = _check_value(rule, f"{rule.key}[{j}]", item)
            if error:
                errors.append(error)
                break
    fg, bg = values.get("pseudo.fg_threshold"), values.get("pseudo.bg_threshold")
    if fg is not None and bg is not None and float(bg) > float(fg):
        errors.append(
            f"pseudo.bg_threshold={bg} > pseudo.fg_threshold={fg}: "
            "bg_threshold must be <= fg_threshold"
        )
    from camseg.units import config_errors  # relative units, pseudo.calibrate (no torch)

    errors += config_errors(cfg)
    val, test = values.get("data.val_fraction"), values.get("data.test_fraction")
    if val is not None and test is not None and float(val) + float(test) >= 1:
        errors.append(
            f"data.val_fraction={val} + data.test_fraction={test} leave no training patients; "
            "keep their sum below 1"
        )
    if {"data.in_channels", "data.context_slices"} <= values.keys():
        try:
            check_in_channels(cfg.data)
        except ConfigError as e:
            errors.append(str(e))
    if errors:
        raise ConfigError("; ".join(errors))


def check_data(cfg: DictConfig, run: RunDir) -> DatasetIndex:
    """Generate the synthetic dataset if the config asks for it, then check every file.

    Every image and mask is decoded (the checks of ``camseg-data check``); files unchanged
    since the last check of this run directory (same size and mtime) are not decoded again.
    The cache lives in the run directory (``<runs_dir>/<run_name>/preflight.json``, shared by
    the jobs of a sweep), never in the dataset root.

    Raises:
        DatasetError: one line with the number of problems and the first ones.
    """
    from camseg.data.synthetic import generate_if_asked

    d = cfg.data
    root = Path(str(d.root))
    spec = OmegaConf.to_container(d.synthetic, resolve=True) if d.get("synthetic") else None
    data_dir = d.get("data_dir")
    generate_if_asked(root, spec, None if data_dir is None else str(data_dir))  # type: ignore[arg-type]
    classes = [str(c) for c in d.classes] if d.get("classes") else None

    t0 = time.time()
    # The experiment's directory, not a sweep job's: every job of a sweep shares one cache.
    base = Path(str(cfg.paths.runs_dir)) / str(cfg.run_name) if "paths" in cfg else run.root
    cache_path = base / CACHE_NAME
    cache = _load_cache(cache_path, root)
    before = dict(cache)
    index, problems, decoded = check_root(root, classes, cache=cache)
    if cache != before:
        write_json_atomic(
            cache_path,
            {"version": CACHE_VERSION, "root": str(root.resolve()), "samples": cache},
        )
    problems.raise_if_any()
    log.info(
        "preflight: %d samples of %s checked in %.1f s (%d decoded, %d unchanged since the last check)",
        len(index),
        root,
        time.time() - t0,
        decoded,
        len(index) - decoded,
    )
    return index


def _load_cache(path: Path, root: Path) -> dict[str, list[int]]:
    """The stamps of the samples that passed, when the cache is for this dataset root."""
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return {}
    if (
        not isinstance(data, dict)
        or data.get("version") != CACHE_VERSION
        or data.get("root") != str(root.resolve())
        or not isinstance(data.get("samples"), dict)
    ):
        return {}
    return {str(k): list(v) for k, v in data["samples"].items() if isinstance(v, list)}
