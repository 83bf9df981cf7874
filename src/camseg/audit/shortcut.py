"""Shortcut flags: a CAM that rests outside the anatomy, or on one corner across images.

An image's map is flagged when most of its energy lies outside the body (a token, a
ruler, text on the air around the patient) or when its peak lies in a corner square;
the dataset is flagged when one cause covers at least ``dataset_share`` of the audited
maps. A lesion can sit near a border, but the same corner holding the peak of a quarter
of all positive images is a fixed-location cue, not anatomy: the verdict names it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from camseg.audit.metrics import CORNERS
from camseg.errors import ConfigError


@dataclass(frozen=True)
class ShortcutRule:
    """Thresholds of the flags (``audit.shortcut`` in the config).

    Args:
        outside_share: an image is flagged when at least this share of its CAM energy lies
            outside the body mask ...
        outside_lift: ... and that energy is at least this many times denser (per pixel)
            outside the body than inside: a flat, uninformative map is not a shortcut.
        corner_band: corner squares are this fraction of each side; an image is flagged
            when its CAM peak lies in one.
        dataset_share: the dataset is flagged when at least this share of the audited maps
            is flagged for one cause (outside the body, or the same corner).
    """

    outside_share: float = 0.5
    outside_lift: float = 2.0
    corner_band: float = 0.2
    dataset_share: float = 0.25

    def __post_init__(self) -> None:
        for name, lo, hi in (
            ("outside_share", 0.0, 1.0),
            ("outside_lift", 0.0, float("inf")),
            ("corner_band", 0.0, 0.5),
            ("dataset_share", 0.0, 1.0),
        ):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and lo < v <= hi):
                raise ConfigError(f"audit.shortcut.{name}={v}: must be in ({lo}, {hi}]")


def outside_lift(share: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    """Energy density outside the body over the density inside: ``(s/a) / ((1-s)/(1-a))``.

    ``share`` (P,) energy share and ``area`` (P,) area share outside the body; 1 for a flat
    map, inf when all energy is outside, NaN where undefined (no body, or no energy).
    """
    share, area = share.double(), area.double()
    lift = (share * (1 - area)) / ((1 - share) * area)
    return torch.where((area > 0) & (area < 1), lift, torch.nan)


def image_flags(
    out_of_body: torch.Tensor, area: torch.Tensor, corner: torch.Tensor, rule: ShortcutRule
) -> list[list[str]]:
    """Per map, the reasons it is flagged: ``outside_body`` and/or ``corner:<name>``.

    ``out_of_body`` (P,) energy share outside the body (NaN: no energy); ``area`` (P,) the
    area share outside the body; ``corner`` (P,) index into :data:`CORNERS` of the peak's
    corner, -1 for none.
    """
    lift = outside_lift(out_of_body, area).tolist()
    out = []
    for share, up, c in zip(out_of_body.tolist(), lift, corner.tolist(), strict=True):
        reasons = []
        # NaN compares False: no energy or no body, no flag.
        if share >= rule.outside_share and up >= rule.outside_lift:
            reasons.append("outside_body")
        if c >= 0:
            reasons.append(f"corner:{CORNERS[c]}")
        out.append(reasons)
    return out


def dataset_verdict(flags: list[list[str]], rule: ShortcutRule) -> dict[str, Any]:
    """The dataset's verdict from every audited map's flags.

    Returns ``flagged``, ``reasons`` (sentences), ``corner`` (the named corner or None),
    ``outside_body_share`` and ``corner_share`` (share of maps per corner) and counts.
    """
    n = len(flags)
    outside = sum("outside_body" in f for f in flags) / n if n else 0.0
    corners = {c: (sum(f"corner:{c}" in f for f in flags) / n if n else 0.0) for c in CORNERS}
    top = max(CORNERS, key=lambda c: corners[c])
    reasons = []
    if n and outside >= rule.dataset_share:
        reasons.append(
            f"{outside:.0%} of the maps put at least {rule.outside_share:.0%} of their energy "
            f"outside the body, {rule.outside_lift:g}x denser than inside"
        )
    corner = top if n and corners[top] >= rule.dataset_share else None
    if corner is not None:
        reasons.append(f"{corners[top]:.0%} of the maps peak in the {corner} corner")
    return {
        "flagged": bool(reasons),
        "reasons": reasons,
        "corner": corner,
        "maps": n,
        "maps_flagged": sum(bool(f) for f in flags),
        "outside_body_share": outside,
        "corner_share": corners,
        "rule": asdict(rule),
    }
