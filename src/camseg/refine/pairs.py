"""Pixel pairs for affinity learning: local offsets, confident labels at the affinity stride.

An affinity network predicts, for every cell of a grid at stride ``s`` and every offset
``(dy, dx)`` inside a disc of ``radius`` cells, how likely the two cells belong to the
same region. Its targets come from pseudo-masks: a pair is a positive when both cells are
confidently background, or confidently the same foreground class; a negative when both
are confident and differ. A cell touching the ignore band (255), or mixing labels inside
its ``s x s`` block, takes part in no pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from camseg.constants import BACKGROUND, IGNORE_INDEX
from camseg.errors import ConfigError

Offset = tuple[int, int]


def local_offsets(radius: int, half: bool = True) -> list[Offset]:
    """Offsets ``(dy, dx)`` with ``0 < dy**2 + dx**2 < radius**2``, in a fixed order.

    ``half``: one of each pair ``o, -o`` (``dy > 0``, or ``dy == 0`` and ``dx > 0``), as
    affinities are symmetric; ``False`` gives the whole disc.
    """
    if radius < 2:
        raise ConfigError(f"pseudo.affinity.radius={radius}: must be >= 2 (cells)")
    out = []
    for dy in range(-radius + 1, radius):
        for dx in range(-radius + 1, radius):
            if not 0 < dy * dy + dx * dx < radius * radius:
                continue
            if half and not (dy > 0 or (dy == 0 and dx > 0)):
                continue
            out.append((dy, dx))
    return out


def shift(x: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    """``out[..., i, j] = x[..., i + dy, j + dx]``, ``fill`` where that falls outside."""
    h, w = x.shape[-2:]
    out = torch.full_like(x, fill)
    ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
    xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
    out[..., yd, xd] = x[..., ys, xs]
    return out


def grid_labels(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B,H,W) labels in {0..K, 255} -> (B,h,w) int64 at ``size``.

    A cell keeps a label only when every pixel it covers has that label (adaptive
    average pooling of one-hot maps); mixed cells and ignore become 255.
    """
    m = mask.long()
    k = int(m[m != IGNORE_INDEX].max().item()) + 1 if bool((m != IGNORE_INDEX).any()) else 1
    index = torch.where(m == IGNORE_INDEX, torch.full_like(m, k), m)
    onehot = F.one_hot(index, k + 1).permute(0, 3, 1, 2).float()
    frac = F.adaptive_avg_pool2d(onehot, size)
    best, label = frac.max(dim=1)
    pure = (best > 1.0 - 1e-6) & (label != k)
    return torch.where(pure, label, torch.full_like(label, IGNORE_INDEX))


def pair_targets(labels: torch.Tensor, offsets: list[Offset]) -> dict[str, torch.Tensor]:
    """Pair masks (B,P,h,w) bool for grid ``labels`` (B,h,w) and ``offsets`` (P of them).

    Pair ``(b, p, i, j)`` joins cell ``(i, j)`` and cell ``(i + dy_p, j + dx_p)``. Keys:
    ``bg_pos`` (both background), ``fg_pos`` (both the same foreground class), ``neg``
    (both confident, different labels). Cells outside the grid or in the ignore band
    take part in none.
    """
    a = labels[:, None].expand(-1, len(offsets), -1, -1)
    b = torch.stack([shift(labels, dy, dx, IGNORE_INDEX) for dy, dx in offsets], dim=1)
    valid = (a != IGNORE_INDEX) & (b != IGNORE_INDEX)
    same = valid & (a == b)
    return {
        "bg_pos": same & (a == BACKGROUND),
        "fg_pos": same & (a != BACKGROUND),
        "neg": valid & (a != b),
    }
