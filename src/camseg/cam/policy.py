"""From normalised CAMs to pseudo-masks: foreground, background and an ignore band."""

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


def present_peak(cams: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,K,H,W) maps and (B,K) bool -> the largest present-class map (B,H,W) and its 1-based
    class (B,H,W) uint8; the peak is -1, below every threshold, where no class is present."""
    masked = torch.where(present[:, :, None, None].to(cams.device), cams, -1.0)
    peak, index = masked.max(dim=1)
    return peak, (index + 1).to(torch.uint8)


def threshold_cams(
    cams: torch.Tensor, present: torch.Tensor, fg_threshold: float, bg_threshold: float
) -> torch.Tensor:
    """(B,K,H,W) maps in [0,1] and (B,K) bool -> (B,H,W) uint8 in {0, 1..K, 255}.

    Foreground k where the largest *present*-class map is >= ``fg_threshold`` (k is
    its 1-based class index); background where it is < ``bg_threshold`` or where no
    class is present; ignore (255) in between. Absent classes never win.
    """
    peak, label = present_peak(cams, present)
    ignore = torch.full_like(label, IGNORE_INDEX)
    background = torch.full_like(label, BACKGROUND)
    mask = torch.where(peak < bg_threshold, background, ignore)
    return torch.where(peak >= fg_threshold, label, mask)


def remove_small_components(mask: torch.Tensor, min_size: int) -> torch.Tensor:
    """Set foreground components (8-connected, per class) under ``min_size`` px to 255.

    Small blobs become *ignore*, not background: a CAM blob is weak evidence either
    way. Runs scipy on the CPU over the whole batch at once per class (images are
    stacked along an axis with no connectivity).
    """
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
        fg_threshold: foreground where a present class's map is >= this.
        bg_threshold: background where every present class's map is < this.
        multilabel: kept for the record (the argmax over present classes serves both
            multi-label and multi-class labels).
        min_component_size: foreground blobs smaller than this (px) become ignore.
        crf: dense-CRF refinement before thresholding (a :class:`CRFConfig`, a
            mapping of its fields, True for defaults, or None). The thresholds then
            apply to the CRF's posterior probabilities.
    """

    def __init__(
        self,
        fg_threshold: float = 0.3,
        bg_threshold: float = 0.05,
        multilabel: bool = True,
        min_component_size: int = 0,
        crf: CRFConfig | Mapping[str, Any] | bool | None = None,
    ) -> None:
        for field, value in (("fg_threshold", fg_threshold), ("bg_threshold", bg_threshold)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"pseudo.{field}={value}: must be in [0, 1]")
        if bg_threshold > fg_threshold:
            raise ConfigError(
                f"pseudo.bg_threshold={bg_threshold} > pseudo.fg_threshold={fg_threshold}: "
                "bg_threshold must be <= fg_threshold"
            )
        if min_component_size < 0:
            raise ConfigError(f"pseudo.min_component_size={min_component_size}: must be >= 0")
        self.fg_threshold = float(fg_threshold)
        self.bg_threshold = float(bg_threshold)
        self.multilabel = multilabel
        self.min_component_size = int(min_component_size)
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

    def threshold(self, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Masks from :meth:`probabilities`' output (thresholds, then small-blob clean-up)."""
        present = present_mask(labels, probs.shape[0]).to(probs.device)
        mask = threshold_cams(probs, present, self.fg_threshold, self.bg_threshold)
        if self.min_component_size > 1:
            mask = remove_small_components(mask, self.min_component_size)
        return mask

    def describe(self) -> dict[str, Any]:
        """What a manifest records about the policy."""
        return {
            "fg_threshold": self.fg_threshold,
            "bg_threshold": self.bg_threshold,
            "multilabel": self.multilabel,
            "min_component_size": self.min_component_size,
            "crf": None if self.crf is None else dataclasses.asdict(self.crf),
        }
