"""From normalised CAMs to pseudo-masks: foreground, background and an ignore band.

Pixel quantities are relative to the image, so one recipe carries across resolutions:
``min_component_size`` is a fraction of the image's area (and the CRF's kernel widths a
fraction of its side, see :mod:`camseg.cam.crf`). The thresholds follow one of three rules,
per image and class (:data:`THRESHOLD_RULES`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from camseg.cam.base import present_mask
from camseg.cam.crf import CRFConfig, crf_refine, import_densecrf
from camseg.constants import BACKGROUND, IGNORE_INDEX
from camseg.errors import ConfigError
from camseg.units import THRESHOLD_RULES, check_min_component_size


def mass_quantiles(maps: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """(B,K,H,W) maps >= 0 and (Q,) fractions in [0,1] -> (Q,B,K) map values.

    Entry q is the smallest map value v such that the pixels below or at v hold at least a
    fraction ``fractions[q]`` of the map's total mass (mass-weighted quantile). A map with
    no mass gets the fraction itself (the absolute rule).
    """
    flat = maps.flatten(2).float()
    values, _ = flat.sort(dim=-1)
    cum = values.cumsum(-1)
    total = cum[..., -1:]
    share = cum / total.clamp_min(1e-12)  # (B,K,N) non-decreasing in [0,1]
    frac = fractions.to(flat)
    index = torch.searchsorted(
        share.contiguous(), frac.view(1, 1, -1).expand(*share.shape[:2], -1).contiguous()
    ).clamp_(max=share.shape[-1] - 1)
    out = values.gather(-1, index).permute(2, 0, 1)  # (Q,B,K)
    return torch.where(total[..., 0] > 0, out, frac.view(-1, 1, 1).expand_as(out))


def rule_thresholds(maps: torch.Tensor, rule: str, value: float) -> torch.Tensor | float:
    """The threshold ``value`` under ``rule`` as per-image, per-class map values (B,K)."""
    if rule == "absolute":
        return value
    if rule == "max_fraction":
        return value * maps.flatten(2).amax(-1)
    if rule == "mass_quantile":
        return mass_quantiles(maps, torch.tensor([value]))[0]
    raise ConfigError(f"pseudo.threshold_rule='{rule}': choose one of {list(THRESHOLD_RULES)}")


def rule_thresholds_many(maps: torch.Tensor, rule: str, values: list[float]) -> list[Any]:
    """:func:`rule_thresholds` for each of ``values`` (a mass quantile sorts the maps once)."""
    if rule == "mass_quantile":
        return list(mass_quantiles(maps, torch.tensor(values)))
    return [rule_thresholds(maps, rule, v) for v in values]


def passes(maps: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """(B,K,H,W) maps and a threshold (a number or (B,K) per image and class) -> (B,K,H,W)
    bool: ``map >= threshold``."""
    t = torch.as_tensor(threshold, dtype=maps.dtype, device=maps.device)
    return maps >= (t[:, :, None, None] if t.ndim == 2 else t)


def threshold_cams(
    cams: torch.Tensor,
    present: torch.Tensor,
    fg_threshold: float | torch.Tensor,
    bg_threshold: float | torch.Tensor,
) -> torch.Tensor:
    """(B,K,H,W) maps in [0,1] and (B,K) bool -> (B,H,W) uint8 in {0, 1..K, 255}.

    Foreground k where a *present* class's map is >= its ``fg_threshold`` (k: the largest
    such map, 1-based); background where every present class's map is < its
    ``bg_threshold``, or where no class is present; ignore (255) in between. Thresholds
    are numbers or (B,K) tensors (per image and class). Absent classes never win.
    """
    here = present[:, :, None, None].to(cams.device)
    above = passes(cams, fg_threshold) & here
    _, index = torch.where(above, cams, -1.0).max(dim=1)
    label = (index + 1).to(torch.uint8)
    background = (~passes(cams, bg_threshold) | ~here).all(dim=1)
    mask = torch.where(
        background,
        torch.full_like(label, BACKGROUND),
        torch.full_like(label, IGNORE_INDEX),
    )
    return torch.where(above.any(dim=1), label, mask)


def remove_small_components(mask: torch.Tensor, min_fraction: float) -> torch.Tensor:
    """Set foreground components (8-connected, per class) under ``min_fraction`` of the
    image's area to 255.

    Small blobs become *ignore*, not background: a CAM blob is weak evidence either
    way. Runs scipy on the CPU over the whole batch at once per class (images are
    stacked along an axis with no connectivity).
    """
    min_size = float(min_fraction) * mask.shape[-2] * mask.shape[-1]
    if min_size <= 1:
        return mask
    from scipy import ndimage

    m = mask.detach().cpu().numpy().copy()
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connectivity within an image, none across images
    for k in np.unique(m):
        if k in (BACKGROUND, IGNORE_INDEX):
            continue
        components, _ = ndimage.label(m == k, structure=structure)
        sizes = np.bincount(components.ravel())
        small = sizes < min_size
        small[0] = False
        m[small[components]] = IGNORE_INDEX
    return torch.from_numpy(m).to(mask.device)


class PseudoMaskPolicy:
    """``(cams (B,K,H,W) in [0,1], labels (B,K)) -> masks (B,H,W) uint8``.

    0 = background, k = class k (1-based), 255 = ignore. See :func:`threshold_cams`.

    Args:
        fg_threshold: foreground where a present class's map passes this (under ``threshold_rule``).
        bg_threshold: background where no present class's map reaches this.
        multilabel: kept for the record (the argmax over present classes serves both
            multi-label and multi-class labels).
        min_component_size: foreground blobs smaller than this fraction of the image's
            area become ignore (0: off).
        crf: dense-CRF refinement before thresholding (a :class:`CRFConfig`, a
            mapping of its fields, True for defaults, or None). The thresholds then
            apply to the CRF's posterior probabilities.
        threshold_rule: how the thresholds read, one of :data:`THRESHOLD_RULES`.
    """

    def __init__(
        self,
        fg_threshold: float = 0.3,
        bg_threshold: float = 0.05,
        multilabel: bool = True,
        min_component_size: float = 0.0,
        crf: CRFConfig | Mapping[str, Any] | bool | None = None,
        threshold_rule: str = "absolute",
    ) -> None:
        for field, value in (("fg_threshold", fg_threshold), ("bg_threshold", bg_threshold)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"pseudo.{field}={value}: must be in [0, 1]")
        if bg_threshold > fg_threshold:
            raise ConfigError(
                f"pseudo.bg_threshold={bg_threshold} > pseudo.fg_threshold={fg_threshold}: "
                "bg_threshold must be <= fg_threshold"
            )
        if threshold_rule not in THRESHOLD_RULES:
            raise ConfigError(
                f"pseudo.threshold_rule='{threshold_rule}': choose one of {list(THRESHOLD_RULES)}"
            )
        self.fg_threshold = float(fg_threshold)
        self.bg_threshold = float(bg_threshold)
        self.multilabel = multilabel
        self.min_component_size = check_min_component_size(min_component_size)
        self.threshold_rule = threshold_rule
        if crf is True:
            crf = CRFConfig()
        elif crf is False:
            crf = None
        elif isinstance(crf, Mapping):
            crf = CRFConfig(**dict(crf))
        self.crf: CRFConfig | None = crf
        if self.crf is not None:
            import_densecrf()  # fail at construction, not after the first batch

    def __call__(
        self,
        cams: torch.Tensor,
        labels: torch.Tensor,
        images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Masks (B,H,W) uint8 on the CAMs' device; ``images`` are needed for the CRF."""
        return self.threshold(self.probabilities(cams, labels, images), labels)

    def probabilities(
        self, cams: torch.Tensor, labels: torch.Tensor, images: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The maps the thresholds apply to: the CAMs, or the CRF posterior when a CRF is set."""
        if cams.ndim != 4:
            raise ValueError(f"cams must be (B,K,H,W), got {tuple(cams.shape)}")
        present = present_mask(labels, cams.shape[0]).to(cams.device)
        if present.shape[1] != cams.shape[1]:
            raise ValueError(f"labels have {present.shape[1]} classes, cams {cams.shape[1]}")
        if self.crf is None:
            return cams
        if images is None:
            raise ValueError("PseudoMaskPolicy with crf needs the images")
        return crf_refine(cams, present, images, self.crf)

    def fg_support(self, maps: torch.Tensor) -> torch.Tensor:
        """(B,K,H,W) maps -> (B,K) share of the pixels where each class's map passes
        ``fg_threshold`` under ``threshold_rule``, the test the masks' foreground takes
        (before the present-class argmax, the CRF and the clean-up)."""
        above = passes(maps, rule_thresholds(maps, self.threshold_rule, self.fg_threshold))
        return above.flatten(2).float().mean(-1)

    def threshold(self, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Masks from :meth:`probabilities`' output (thresholds, then small-blob clean-up)."""
        present = present_mask(labels, probs.shape[0]).to(probs.device)
        fg = rule_thresholds(probs, self.threshold_rule, self.fg_threshold)
        bg = rule_thresholds(probs, self.threshold_rule, self.bg_threshold)
        mask = threshold_cams(probs, present, fg, bg)
        if self.min_component_size > 0:
            mask = remove_small_components(mask, self.min_component_size)
        return mask

    def describe(self) -> dict[str, Any]:
        """What a manifest records about the policy."""
        return {
            "fg_threshold": self.fg_threshold,
            "bg_threshold": self.bg_threshold,
            "threshold_rule": self.threshold_rule,
            "multilabel": self.multilabel,
            "min_component_size": self.min_component_size,
            "crf": None if self.crf is None else dataclasses.asdict(self.crf),
        }
