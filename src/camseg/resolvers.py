"""OmegaConf resolvers of camseg's config tree, registered when ``camseg`` is imported.

``data.in_channels`` is derived, not written by hand::

    in_channels: ${camseg.in_channels:${data.slice_channels},${data.context_slices}}

the channels of one slice (``data.slice_channels``: 1 grey, 3 RGB or stacked CT windows;
null counts as 1) times the ``2 * context_slices + 1`` slices a 2.5D input stacks. An
explicit ``data.in_channels`` still works when it agrees (:func:`check_in_channels`).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from camseg.errors import ConfigError

IN_CHANNELS = "camseg.in_channels"


def _count(value: Any, key: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key}={value!r}: must be an integer >= {low}")
    return value


def derive_in_channels(slice_channels: int | None, context_slices: int = 0) -> int:
    """Network input channels: ``slice_channels`` (None: 1) x ``(2 * context_slices + 1)``."""
    per_slice = 1 if slice_channels is None else _count(slice_channels, "data.slice_channels", 1)
    return per_slice * (2 * _count(context_slices, "data.context_slices", 0) + 1)


def check_channel_counts(in_channels: int, slice_channels: int | None, context_slices: int) -> None:
    """Refuse ``in_channels`` unless it is ``slice_channels`` x ``(2 * context_slices + 1)``.
    Without ``slice_channels`` any value is taken (the data module checks that it splits
    evenly over the slices)."""
    if slice_channels is None:
        return
    expected = derive_in_channels(slice_channels, context_slices)
    if in_channels != expected:
        raise ConfigError(
            f"data.in_channels={in_channels} disagrees with data.slice_channels={slice_channels} "
            f"x {2 * context_slices + 1} slices (data.context_slices={context_slices}) = "
            f"{expected}; drop data.in_channels (it is derived) or set it to {expected}"
        )


def check_in_channels(data: DictConfig) -> None:
    """:func:`check_channel_counts` on the ``data`` config node, for an explicit value."""
    if "in_channels" not in data or OmegaConf.is_interpolation(data, "in_channels"):
        return
    check_channel_counts(
        data.get("in_channels"), data.get("slice_channels"), data.get("context_slices", 0)
    )


def register() -> None:
    """Register camseg's resolvers with OmegaConf (idempotent)."""
    if not OmegaConf.has_resolver(IN_CHANNELS):
        OmegaConf.register_new_resolver(IN_CHANNELS, derive_in_channels)
