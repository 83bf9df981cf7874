"""Confident seeds for affinity learning, from two refined views of the CAMs (PSA / IRN).

AffinityNet (PSA) learns from the CAMs passed through a dense CRF twice: once with a
strong background (a low power ``alpha`` on ``1 - max CAM``), whose foreground is the
*confident foreground*, and once with a weak background (a high power), whose background
is the *confident background*. Pixels that are neither (the CAMs' uncertain rim) are
ignored, so the affinity net never learns a boundary from a bloated CAM. IRN does the same
with two constant background scores. Here both views are CRF posteriors; the rule that
combines them is plain tensor code, tested on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from camseg.constants import BACKGROUND, IGNORE_INDEX


def posterior_labels(probs: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Argmax labels (B,H,W) int64 in {0..K} of foreground posteriors (B,K,H,W) in [0,1].

    The background's probability is what the present classes leave, ``1 - sum_k p_k``
    (the CRF's posterior sums to 1 over background and the present classes). Absent
    classes never win; an image with no present class is all background.
    """
    here = present[:, :, None, None].to(probs.device)
    fg = torch.where(here, probs.float(), torch.zeros_like(probs, dtype=torch.float32))
    bg = (1.0 - fg.sum(dim=1, keepdim=True)).clamp_min(0.0)
    scores = torch.cat([bg, torch.where(here, fg, torch.full_like(fg, -1.0))], dim=1)
    return scores.argmax(dim=1)


def combine_seeds(
    fg_view: torch.Tensor,
    bg_view: torch.Tensor,
    present: torch.Tensor,
    band: int = 0,
) -> torch.Tensor:
    """Seed masks (B,H,W) uint8 in {0, 1..K, 255} from two posteriors (B,K,H,W).

    ``fg_view``: the strong-background view; where its argmax is class k, the seed is k.
    ``bg_view``: the weak-background view; where its argmax is background, the seed is
    background (this wins over the first view, as in PSA, and the two rarely disagree).
    Everywhere else: ignore (255). ``band`` (pixels): background seeds within this
    Chebyshev distance of a foreground seed become ignore too, a margin around the
    objects for the affinity net's negatives to stay clear of the CAMs' rim.
    """
    fg_label = posterior_labels(fg_view, present)
    bg_label = posterior_labels(bg_view, present)
    seeds = torch.full_like(fg_label, IGNORE_INDEX)
    seeds = torch.where(fg_label != BACKGROUND, fg_label, seeds)
    seeds = torch.where(bg_label == BACKGROUND, torch.full_like(seeds, BACKGROUND), seeds)
    if band > 0:
        is_fg = ((seeds != BACKGROUND) & (seeds != IGNORE_INDEX)).float()[:, None]
        near = F.max_pool2d(is_fg, 2 * band + 1, stride=1, padding=band)[:, 0] > 0
        seeds = torch.where(
            near & (seeds == BACKGROUND), torch.full_like(seeds, IGNORE_INDEX), seeds
        )
    return seeds.to(torch.uint8)
