"""Shortcut flags: a CAM that rests outside the anatomy, or on one corner across images.

An image's map is flagged when most of its energy lies outside the body (a token, a
ruler, text on the air around the patient) or when its peak lies in a corner square;
the dataset is flagged when one cause covers at least ``dataset_share`` of the audited
maps. A lesion can sit near a border, but the same corner holding the peak of a quarter
of all positive images is a fixed-location cue, not anatomy: the verdict names it.

Per-image peaks miss a cue that is secondary in every image (the classifier learned the
lesions too) but sits in the same place in all of them. The dataset-level *fixed
location* test looks at the mean of the normalised maps instead: lesions at varying
places smear out in the mean, a cue at one place adds up. Each corner of the mean map is
compared with its mirror image across the vertical midline (top-left with top-right):
anatomy is roughly left-right symmetric, a token or a text marker is not. A corner at
least ``fixed_contrast`` times as dense as its mirror corner, and at least ``fixed_lift``
times as dense as the mean map on average (two nearly empty corners of air do not count),
is flagged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from camseg.audit.metrics import CORNERS, corner_regions
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
        fixed_lift: the fixed-location test needs a corner square of the mean normalised
            map to hold at least this many times the map's average energy per pixel (the
            corner's share of the mean map's energy over its share of the area) ...
        fixed_contrast: ... and this many times the energy of its left-right mirror corner.
    """

    outside_share: float = 0.5
    outside_lift: float = 2.0
    corner_band: float = 0.2
    dataset_share: float = 0.25
    fixed_lift: float = 0.5
    fixed_contrast: float = 2.0

    def __post_init__(self) -> None:
        for name, lo, hi in (
            ("outside_share", 0.0, 1.0),
            ("outside_lift", 0.0, float("inf")),
            ("corner_band", 0.0, 0.5),
            ("dataset_share", 0.0, 1.0),
            ("fixed_lift", 0.0, float("inf")),
            ("fixed_contrast", 1.0, float("inf")),
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


#: Each corner's mirror image across the vertical midline.
MIRROR = {
    "top-left": "top-right",
    "top-right": "top-left",
    "bottom-left": "bottom-right",
    "bottom-right": "bottom-left",
}


def fixed_location(mean_map: torch.Tensor, corner_band: float) -> dict[str, Any]:
    """Each corner's lift and mirror contrast in the mean normalised map (H,W) >= 0 of the
    audited maps.

    ``lift[c]`` = the corner's share of the mean map's energy / its share of the area
    (= its mean value / the map's mean value): 1 for a flat map, about 0 where no map
    ever looks, large where the maps agree on one place. ``contrast[c]`` = ``lift[c]``
    over the lift of its left-right mirror corner (at least 1e-3 of the average, so that
    it stays finite): about 1 for a left-right symmetric focus. ``peak_corner``: the corner
    holding the mean map's maximum, or None. All None for an all-zero map.
    """
    if mean_map.ndim != 2:
        raise ValueError(f"mean map must be (H,W), got shape {tuple(mean_map.shape)}")
    m = mean_map.double().clamp_min(0)
    h, w = m.shape
    regions = corner_regions(h, w, corner_band, m.device)
    total = m.sum().item()
    if total <= 0:
        return {
            "lift": dict.fromkeys(CORNERS),
            "contrast": dict.fromkeys(CORNERS),
            "peak_corner": None,
        }
    area = regions.flatten(1).double().mean(dim=1)
    share = (m * regions).flatten(1).sum(dim=1) / total
    lift = dict(zip(CORNERS, (share / area).tolist(), strict=True))
    contrast = {c: lift[c] / max(lift[MIRROR[c]], 1e-3) for c in CORNERS}
    # The peak is in a corner when that corner's maximum beats every pixel outside the corners
    # (a flat map peaks nowhere).
    rest = m[~regions.any(dim=0)]
    rest_max = rest.max().item() if rest.numel() else 0.0
    corner_max = [m[r].max().item() for r in regions]
    top = max(range(len(CORNERS)), key=lambda i: corner_max[i])
    peak = CORNERS[top] if corner_max[top] > rest_max else None
    return {"lift": lift, "contrast": contrast, "peak_corner": peak}


def dataset_verdict(
    flags: list[list[str]], rule: ShortcutRule, fixed: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The dataset's verdict from every audited map's flags and, when given, the mean
    map's corner lifts and mirror contrasts (:func:`fixed_location`).

    Returns ``flagged``, ``reasons`` (sentences), ``causes`` (``outside_body``,
    ``corner:<name>``, ``fixed_location:<name>``), ``corner`` (the named corner or None),
    ``outside_body_share`` and ``corner_share`` (share of maps per corner), the
    ``fixed_location`` statistic and counts.
    """
    n = len(flags)
    outside = sum("outside_body" in f for f in flags) / n if n else 0.0
    corners = {c: (sum(f"corner:{c}" in f for f in flags) / n if n else 0.0) for c in CORNERS}
    top = max(CORNERS, key=lambda c: corners[c])
    reasons, causes = [], []
    if n and outside >= rule.dataset_share:
        reasons.append(
            f"{outside:.0%} of the maps put at least {rule.outside_share:.0%} of their energy "
            f"outside the body, {rule.outside_lift:g}x denser than inside"
        )
        causes.append("outside_body")
    corner = top if n and corners[top] >= rule.dataset_share else None
    if corner is not None:
        reasons.append(f"{corners[top]:.0%} of the maps peak in the {corner} corner")
        causes.append(f"corner:{corner}")
    lifts = (fixed or {}).get("lift") or {}
    contrasts = (fixed or {}).get("contrast") or {}
    hot = [
        c
        for c in CORNERS
        if n
        and lifts.get(c) is not None
        and lifts[c] >= rule.fixed_lift
        and contrasts[c] >= rule.fixed_contrast
    ]
    if hot:
        c = max(hot, key=lambda k: lifts[k])
        reasons.append(
            f"the mean map of the {n} maps is {contrasts[c]:.1f}x denser in the {c} corner "
            f"than in the {MIRROR[c]} one, {lifts[c]:.1f}x its average (a fixed location "
            "across images)"
        )
        causes.append(f"fixed_location:{c}")
        corner = corner or c
    return {
        "flagged": bool(reasons),
        "reasons": reasons,
        "causes": causes,
        "corner": corner,
        "fixed_location": fixed,
        "maps": n,
        "maps_flagged": sum(bool(f) for f in flags),
        "outside_body_share": outside,
        "corner_share": corners,
        "rule": asdict(rule),
    }
