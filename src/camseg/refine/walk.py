"""Affinities from features, and the sparse local random walk of CAMs over them.

Memory: the transition matrix is never dense. Each grid cell keeps weights to its
``Q = 2P + 1`` neighbours inside the radius (itself included), a (B,Q,h,w) tensor; one
step of the walk is ``Q`` shifted multiply-adds of the (B,K,h,w) maps. At 512 px, stride
4 and radius 5 that is 69 weights per cell of a 128 x 128 grid: about 4.5 MB per image,
where the dense (HW)x(HW) matrix of the same grid would take 1 GiB (and 256 GiB at full
resolution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from camseg.constants import IGNORE_INDEX
from camseg.refine.pairs import Offset, shift


def affinities(features: torch.Tensor, offsets: list[Offset]) -> torch.Tensor:
    """(B,C,h,w) features -> (B,P,h,w) affinities ``exp(-mean_c |f_i - f_(i+o)|)`` in (0, 1].

    AffinityNet's (PSA) form. Pairs whose second cell falls outside the grid get 0.
    """
    out = []
    for dy, dx in offsets:
        other = shift(features, dy, dx, 0.0)
        aff = torch.exp(-(features - other).abs().mean(dim=1))
        inside = shift(torch.ones_like(features[:, 0]), dy, dx, 0.0)
        out.append(aff * inside)
    return torch.stack(out, dim=1)


def neighbourhood(
    affinity: torch.Tensor, offsets: list[Offset]
) -> tuple[torch.Tensor, list[Offset]]:
    """Half-disc affinities (B,P,h,w) -> symmetric whole-disc weights (B,2P+1,h,w) with a
    self-loop of 1, and their offsets.

    The weight from cell ``i`` to ``i - o`` is the weight from ``i - o`` to ``i``: the
    half-disc map shifted by ``-o``.
    """
    ones = torch.ones_like(affinity[:, :1])
    back = [shift(affinity[:, p], -dy, -dx, 0.0) for p, (dy, dx) in enumerate(offsets)]
    weights = torch.cat([ones, affinity, torch.stack(back, dim=1)], dim=1)
    full = [(0, 0), *offsets, *[(-dy, -dx) for dy, dx in offsets]]
    return weights, full


def transition(weights: torch.Tensor) -> torch.Tensor:
    """Row-normalise: each cell's weights to its neighbours sum to 1 (``D^-1 A``)."""
    return weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)


def random_walk(
    maps: torch.Tensor, trans: torch.Tensor, offsets: list[Offset], iterations: int
) -> torch.Tensor:
    """``iterations`` steps of ``v <- T v`` for maps (B,K,h,w) and local ``T`` (B,Q,h,w).

    ``(T v)_i = sum_q T[q, i] v_(i + o_q)``: each cell takes the transition-weighted mean
    of its neighbours, so scores spread inside regions of high affinity and stop at
    boundaries. Dense equivalent: ``T^t v`` with ``T`` (HW)x(HW) (see the tests).
    """
    r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    h, w = maps.shape[-2:]
    v = maps
    for _ in range(iterations):
        # One zero-padded copy per step; each offset reads a view of it (= shift(v, dy, dx, 0)).
        padded = F.pad(v, (r, r, r, r))
        acc = torch.zeros_like(v)
        for q, (dy, dx) in enumerate(offsets):
            acc.addcmul_(trans[:, q : q + 1], padded[..., r + dy : r + dy + h, r + dx : r + dx + w])
        v = acc
    return v


def walk_cams(
    cams: torch.Tensor,
    affinity: torch.Tensor,
    offsets: list[Offset],
    beta: float,
    iterations: int,
) -> torch.Tensor:
    """CAMs (B,K,H,W) in [0,1] -> random-walked CAMs (B,K,H,W), each map max-normalised.

    The CAMs are pooled to the affinity grid (h,w), walked over ``affinity ** beta`` (beta
    sharpens the contrast between inside and across boundaries, as in PSA/IRN), and
    upsampled back. A map that is zero stays zero.
    """
    size = cams.shape[-2:]
    grid = F.adaptive_avg_pool2d(cams.float(), (int(affinity.shape[-2]), int(affinity.shape[-1])))
    weights, full = neighbourhood(affinity.float().pow(beta), offsets)
    walked = random_walk(grid, transition(weights), full, iterations)
    up = F.interpolate(walked, size=size, mode="bilinear", align_corners=False).clamp_min(0)
    peak = up.amax(dim=(2, 3), keepdim=True)
    return torch.where(peak > 0, up / peak.clamp_min(1e-12), torch.zeros_like(up))


def walk_with_background(
    cams: torch.Tensor,
    present: torch.Tensor,
    affinity: torch.Tensor,
    offsets: list[Offset],
    beta: float,
    iterations: int,
    bg_power: float,
) -> torch.Tensor:
    """CAMs (B,K,H,W) in [0,1] -> walked scores (B,1+K,H,W): background first, then the
    classes, as shares that sum to 1 per pixel.

    PSA / IRN: the background gets a map of its own, ``(1 - max_k CAM_k) ** bg_power``
    over the present classes, and is walked together with the class CAMs (absent classes
    walk a zero map), so background spreads inside the regions the affinities connect just
    as the classes do, and each pixel compares them. The shares divide by the sum over
    channels; a pixel with no score at all (outside every walk) is all background.
    """
    here = present[:, :, None, None].to(cams.device)
    fg = torch.where(here, cams.float(), torch.zeros_like(cams, dtype=torch.float32))
    bg = (1.0 - fg.amax(dim=1, keepdim=True)).clamp(0.0, 1.0).pow(bg_power)
    size = cams.shape[-2:]
    grid = F.adaptive_avg_pool2d(
        torch.cat([bg, fg], dim=1), (int(affinity.shape[-2]), int(affinity.shape[-1]))
    )
    weights, full = neighbourhood(affinity.float().pow(beta), offsets)
    walked = random_walk(grid, transition(weights), full, iterations)
    up = F.interpolate(walked, size=size, mode="bilinear", align_corners=False).clamp_min(0)
    total = up.sum(dim=1, keepdim=True)
    empty = torch.zeros_like(up)
    empty[:, 0] = 1.0
    return torch.where(total > 1e-12, up / total.clamp_min(1e-12), empty)


def labels_from_walk(shares: torch.Tensor, min_share: float) -> torch.Tensor:
    """Walked shares (B,1+K,H,W) -> masks (B,H,W) uint8: the argmax (0 background,
    k = class k), ignore (255) where the winner's share is below ``min_share`` (ambiguous)."""
    top, label = shares.max(dim=1)
    return torch.where(top >= min_share, label, torch.full_like(label, IGNORE_INDEX)).to(
        torch.uint8
    )
