"""CT intensity windows: Hounsfield units -> uint8 display values.

A window (center ``c``, width ``w``) maps ``[c - w/2, c + w/2]`` HU linearly onto
``0..255``: ``round_half_up((clip(HU, lo, hi) - lo) / w * 255)``. One window gives a
grayscale image; three windows stacked give an RGB image whose channels a pretrained
encoder sees as different tissue contrasts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from camseg.errors import ConfigError


@dataclass(frozen=True)
class CtWindow:
    """A CT display window in HU: ``center`` and ``width`` (> 0)."""

    name: str
    center: float
    width: float

    @property
    def low(self) -> float:
        return self.center - self.width / 2

    @property
    def high(self) -> float:
        return self.center + self.width / 2


WINDOW_PRESETS: dict[str, CtWindow] = {
    w.name: w
    for w in (
        CtWindow("brain", 40, 80),
        CtWindow("subdural", 80, 200),
        CtWindow("stroke", 40, 40),
        CtWindow("bone", 600, 2800),
        CtWindow("lung", -600, 1500),
        CtWindow("mediastinum", 50, 350),
        CtWindow("soft", 50, 400),
    )
}

_NUMERIC = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*$")


def parse_windows(spec: str | list[str] | tuple[str, ...]) -> tuple[CtWindow, ...]:
    """Parse ``"brain,subdural,bone"`` or ``"40/80,-600/1500"`` into 1 or 3 windows.

    Raises:
        ConfigError: unknown name, width <= 0, or a count other than 1 or 3 (PNG has
            no two-channel colour mode without alpha).
    """
    tokens = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec)]
    tokens = [t for t in tokens if t]
    windows: list[CtWindow] = []
    for t in tokens:
        if t.lower() in WINDOW_PRESETS:
            windows.append(WINDOW_PRESETS[t.lower()])
            continue
        m = _NUMERIC.match(t)
        if m is None:
            raise ConfigError(
                f"--windows: '{t}' is not a window; use a name from {sorted(WINDOW_PRESETS)} "
                "or CENTER/WIDTH in HU such as 40/80"
            )
        center, width = float(m.group(1)), float(m.group(2))
        if width <= 0:
            raise ConfigError(f"--windows: '{t}' has width {width:g}; a window width must be > 0")
        windows.append(CtWindow(t, center, width))
    if len(windows) not in (1, 3):
        raise ConfigError(
            f"--windows: got {len(windows)} window(s) ({spec!r}); give 1 (grayscale) or 3 (RGB)"
        )
    return tuple(windows)


def apply_window(hu: np.ndarray, window: CtWindow) -> np.ndarray:
    """HU array (any shape) -> uint8 of the same shape."""
    scaled = (np.clip(hu.astype(np.float64), window.low, window.high) - window.low) / window.width
    return np.floor(scaled * 255.0 + 0.5).astype(np.uint8)


def apply_windows(hu: np.ndarray, windows: tuple[CtWindow, ...]) -> np.ndarray:
    """HU slice (H,W) -> uint8 (H,W) for one window, (H,W,3) for three."""
    if len(windows) == 1:
        return apply_window(hu, windows[0])
    return np.stack([apply_window(hu, w) for w in windows], axis=-1)
