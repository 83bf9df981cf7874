"""Stage-2 settings in image-relative units, and the calibration grid: checks without torch.

The preflight runs these before anything heavy is imported, so a pixel value where a
fraction is expected fails in a blink, before stage 1 trains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from camseg.errors import ConfigError

# absolute: map >= t. max_fraction: map >= t x the image's maximum of that class's map.
# mass_quantile: t is a mass-weighted quantile: the pixels below it hold less than a fraction t
# of the map's mass (t = 0.3 keeps the brightest pixels holding about 70 % of it).
THRESHOLD_RULES = ("absolute", "max_fraction", "mass_quantile")
KERNEL_WIDTHS = ("gaussian_sxy", "bilateral_sxy")


def check_min_component_size(value: Any) -> float:
    """``pseudo.min_component_size`` as a fraction of the image area in [0, 1), or a ConfigError."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"pseudo.min_component_size={value}: not a number; a fraction of the image area in [0, 1)"
        ) from None
    if not 0.0 <= value < 1.0:
        raise ConfigError(
            f"pseudo.min_component_size={value:g}: a fraction of the image area in [0, 1) "
            f"(e.g. 20 px of a 512x512 image: {20 / 512**2:.3g}), not pixels"
        )
    return value


def check_kernel_width(field: str, value: float) -> None:
    """A CRF kernel width: a fraction of the image side in (0, 1]."""
    if value > 1:
        raise ConfigError(
            f"pseudo.crf.{field}={value}: a fraction of the image side in "
            f"(0, 1], not pixels (e.g. 3 px of a 256 px image: {3 / 256:.4g})"
        )


def calibrate_mode(value: Any) -> str:
    """``pseudo.calibrate`` as ``"false"``, ``"true"`` or ``"auto"``, or a ConfigError."""
    text = str(value).lower() if value is not None else "false"
    if text not in ("false", "true", "auto"):
        raise ConfigError(f"pseudo.calibrate={value}: use true, false or auto")
    return text


@dataclass(frozen=True)
class Grid:
    """What ``pseudo.calibrate`` searches (``pseudo.calibration.*``).

    Every combination of a CRF candidate (none, or the base CRF with each of
    ``crf_bg_powers``), a threshold rule, a foreground threshold and a clean-up size is
    scored by validation Dice; the background threshold, which Dice cannot see (ignore
    and background both count as "not foreground"), is then the largest candidate below
    the chosen foreground threshold that labels at most ``max_missed_as_background`` of
    the validation lesion pixels as background.
    """

    rules: tuple[str, ...] = THRESHOLD_RULES
    fg_thresholds: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    bg_thresholds: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
    min_component_sizes: tuple[float, ...] = (0.0, 1e-4, 5e-4)
    crf_bg_powers: tuple[float, ...] = (0.25, 0.5, 1.0)
    max_missed_as_background: float = 0.05

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> Grid:
        node = dict(node or {})
        unknown = sorted(set(node) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"pseudo.calibration: unknown key(s) {unknown}")
        kwargs: dict[str, Any] = {
            k: (tuple(float(x) for x in v) if k != "rules" else tuple(str(x) for x in v))
            if isinstance(v, Iterable) and not isinstance(v, str)
            else float(v)
            for k, v in node.items()
        }
        grid = cls(**kwargs)
        grid.check()
        return grid

    def check(self) -> None:
        for rule in self.rules:
            if rule not in THRESHOLD_RULES:
                raise ConfigError(
                    f"pseudo.calibration.rules: '{rule}' is not one of {list(THRESHOLD_RULES)}"
                )
        for name in ("rules", "fg_thresholds", "bg_thresholds", "min_component_sizes"):
            if not getattr(self, name):
                raise ConfigError(f"pseudo.calibration.{name} is empty; give at least one value")
        for name in ("fg_thresholds", "bg_thresholds", "max_missed_as_background"):
            values = getattr(self, name)
            for v in values if isinstance(values, tuple) else (values,):
                if not 0.0 <= v <= 1.0:
                    raise ConfigError(f"pseudo.calibration.{name}: {v} is not in [0, 1]")
        for v in self.min_component_sizes:
            check_min_component_size(v)
        for v in self.crf_bg_powers:
            if v <= 0:
                raise ConfigError(f"pseudo.calibration.crf_bg_powers: {v} must be > 0")

    def describe(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    def size(self, with_crf: bool) -> int:
        crfs = 1 + (len(self.crf_bg_powers) if with_crf else 0)
        return crfs * len(self.rules) * len(self.fg_thresholds) * len(self.min_component_sizes)


def config_errors(cfg: DictConfig) -> list[str]:
    """Preflight of the stage-2 keys in image-relative units and of the calibration settings,
    one line each (before stage 1 trains for hours)."""
    p = cfg.get("pseudo")
    if p is None:
        return []
    errors = []
    checks: list[Any] = [
        lambda: check_min_component_size(p.get("min_component_size", 0) or 0),
        lambda: calibrate_mode(p.get("calibrate", False)),
    ]
    crf = p.get("crf")
    if crf:
        for field in KERNEL_WIDTHS:
            if crf.get(field) is not None:
                checks.append(lambda f=field: check_kernel_width(f, float(crf.get(f))))
    try:
        mode = calibrate_mode(p.get("calibrate", False))
    except ConfigError:
        mode = "false"  # reported by the check above
    if p.get("calibration") is not None and mode != "false":
        checks.append(
            lambda: Grid.from_config(OmegaConf.to_container(p.calibration, resolve=True))  # type: ignore[arg-type]
        )
    for check in checks:
        try:
            check()
        except ConfigError as e:
            errors.append(str(e))
        except (TypeError, ValueError) as e:
            errors.append(f"pseudo: {e}")
    return errors
