"""Where a CAM puts its energy: inside the lesion, outside the body, in a border or corner.

Every function takes maps ``(P,H,W) >= 0``, one per (image, class) pair, and works on the
whole batch at once on the maps' device. An undefined value (an all-zero map, an empty
mask) is NaN, so that means over a dataset skip it (``nanmean``) instead of counting it
as 0 or 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Corner names, in the order of :func:`corner_regions`.
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
#: Border band names, in the order of :func:`border_regions`.
BORDERS = ("top", "bottom", "left", "right")


def _check(cams: torch.Tensor) -> None:
    if cams.ndim != 3:
        raise ValueError(f"maps must be (P,H,W), got shape {tuple(cams.shape)}")


def energy_share(cams: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Share of each map's energy inside ``region`` (P,H,W) or (H,W) bool: (P,), NaN for a zero map."""
    _check(cams)
    cams = cams.float().clamp_min(0)
    total = cams.sum(dim=(1, 2))
    inside = (cams * region.to(cams.dtype)).sum(dim=(1, 2))
    return torch.where(total > 0, inside / total.clamp_min(1e-12), torch.nan)


def energy_pointing(cams: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Energy-based pointing game: share of the positive CAM energy inside the mask, (P,).

    NaN where the mask is empty (nothing to point at) or the map is all zero.
    """
    share = energy_share(cams, masks)
    return torch.where(masks.flatten(1).any(dim=1), share, torch.nan)


def peaks(cams: torch.Tensor) -> torch.Tensor:
    """(row, col) of each map's maximum, (P,2) long (the first one on ties)."""
    _check(cams)
    flat = cams.flatten(1).argmax(dim=1)
    w = cams.shape[-1]
    return torch.stack((flat // w, flat % w), dim=1)


def _disk(radius: int, device: torch.device) -> torch.Tensor:
    r = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= radius**2).float()


def dilate(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """(P,H,W) bool masks grown by a disk of ``radius`` pixels."""
    if radius <= 0:
        return masks.bool()
    kernel = _disk(radius, masks.device)[None, None]
    grown = F.conv2d(masks[:, None].float(), kernel, padding=radius)[:, 0]
    return grown > 0.5


def pointing_game(cams: torch.Tensor, masks: torch.Tensor, tolerance: float = 0.0) -> torch.Tensor:
    """1.0 where the map's peak lies in the mask, or within ``tolerance`` of it, else 0.0; (P,).

    ``tolerance`` is a fraction of the image's longer side (0.015 on a 256-pixel image is
    the classic 4 pixels), so the test means the same at every resolution. NaN where the
    mask is empty or the map all zero (it points nowhere).
    """
    _check(cams)
    radius = round(tolerance * max(cams.shape[-2:]))
    grown = dilate(masks.bool(), radius)
    rc = peaks(cams)
    idx = torch.arange(len(cams), device=cams.device)
    hit = grown[idx, rc[:, 0], rc[:, 1]].float()
    defined = masks.flatten(1).any(dim=1) & (cams.flatten(1).amax(dim=1) > 0)
    return torch.where(defined, hit, torch.nan)


def _open(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Morphological opening (erode then dilate) of (B,H,W) bool by a k x k square."""
    if k <= 1:
        return mask
    x = mask[:, None].float()
    pad = k // 2
    eroded = -F.max_pool2d(-F.pad(x, (pad, k - 1 - pad, pad, k - 1 - pad), value=1.0), k, 1)
    opened = F.max_pool2d(F.pad(eroded, (pad, k - 1 - pad, pad, k - 1 - pad)), k, 1)
    return opened[:, 0] > 0.5


def _fill(mask: torch.Tensor) -> torch.Tensor:
    """Fill each mask between its extremes along rows and columns (holes of convex-ish bodies)."""
    m = mask.to(torch.uint8)
    left = m.cummax(dim=2).values
    right = m.flip(2).cummax(dim=2).values.flip(2)
    up = m.cummax(dim=1).values
    down = m.flip(1).cummax(dim=1).values.flip(1)
    return (left & right & up & down).bool()


def body_mask(
    intensity: torch.Tensor, threshold: float = 0.1, opening: float = 0.08
) -> torch.Tensor:
    """The anatomy, from intensity alone: (B,H,W) in [0,1] -> (B,H,W) bool.

    Pixels brighter than ``threshold`` (air and the scanner's background are dark), opened
    by a square of ``opening`` x the image's shorter side, which removes objects smaller
    than it (tokens, text, rulers a few pixels wide), then filled between their extremes
    along rows and columns (dark ventricles and lesions inside the body stay body).
    """
    if intensity.ndim != 3:
        raise ValueError(f"intensity must be (B,H,W), got shape {tuple(intensity.shape)}")
    k = max(1, math.ceil(opening * min(intensity.shape[-2:])))
    return _fill(_open(intensity > threshold, k))


def out_of_body_share(cams: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
    """Share of each map's energy outside the body mask (P,H,W) bool: (P,), NaN for a zero map."""
    return energy_share(cams, ~body.bool())


def _band(size: int, band: float) -> int:
    return max(1, round(band * size))


def border_regions(height: int, width: int, band: float, device: torch.device) -> torch.Tensor:
    """(4,H,W) bool: the top, bottom, left and right bands, ``band`` x the side thick."""
    bh, bw = _band(height, band), _band(width, band)
    out = torch.zeros(4, height, width, dtype=torch.bool, device=device)
    out[0, :bh], out[1, height - bh :], out[2, :, :bw], out[3, :, width - bw :] = (True,) * 4
    return out


def corner_regions(height: int, width: int, band: float, device: torch.device) -> torch.Tensor:
    """(4,H,W) bool: the corner squares where two bands of :func:`border_regions` meet."""
    b = border_regions(height, width, band, device)
    return torch.stack((b[0] & b[2], b[0] & b[3], b[1] & b[2], b[1] & b[3]))


def region_shares(cams: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Energy share of each map in each region (R,H,W) bool: (P,R), NaN rows for zero maps."""
    _check(cams)
    cams = cams.float().clamp_min(0)
    total = cams.sum(dim=(1, 2))
    inside = torch.einsum("phw,rhw->pr", cams, regions.to(cams.dtype))
    return torch.where(total[:, None] > 0, inside / total.clamp_min(1e-12)[:, None], torch.nan)


def peak_corner(cams: torch.Tensor, band: float) -> torch.Tensor:
    """Index into :data:`CORNERS` of the corner holding each map's peak, -1 if none: (P,)."""
    h, w = cams.shape[-2:]
    regions = corner_regions(h, w, band, cams.device)
    rc = peaks(cams)
    inside = regions[:, rc[:, 0], rc[:, 1]].T  # (P,4)
    any_ = inside.any(dim=1) & (cams.flatten(1).amax(dim=1) > 0)  # a zero map points nowhere
    return torch.where(any_, inside.float().argmax(dim=1), -1)
