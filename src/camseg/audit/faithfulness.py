"""Faithfulness of a saliency map: does removing what it points at change the prediction?

* **Deletion / insertion** (Petsiuk et al., RISE 2018): the pixels are ranked by saliency;
  deletion replaces the top ``k`` of them by a baseline and insertion starts from the
  baseline and puts them back, for ``k`` in ``steps + 1`` even steps from 0 to all pixels.
  The area under the class score curve (x = fraction of pixels, trapezoids) is low for a
  faithful map under deletion and high under insertion.
* **Confidence change** of the image multiplied by its [0,1] map (Chattopadhyay et al.,
  Grad-CAM++ 2018; pytorch-grad-cam's ``CamMultImageConfidenceChange``): the average drop
  ``max(0, before - after) / before`` and the share of images whose score increases.

Batched: the perturbed copies of all images and steps are built on the device and go
through the model ``batch_size`` at a time, so a batch of P images costs about
``2 P (steps - 1) / batch_size`` forward passes instead of ``2 P (steps - 1)``: the
curves' end points are the plain image (whose score the caller has) and the baseline
(one image for all when it is the mean), never perturbed copies of them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

#: ``logits (N,K) -> scores (N,K)``: sigmoid, softmax or identity.
ScoreFn = Callable[[torch.Tensor], torch.Tensor]
BASELINES = ("mean", "blur")


def class_scores(multilabel: bool) -> ScoreFn:
    """The class probability the classifier was trained for: sigmoid (multi-label) or softmax."""
    if multilabel:
        return torch.sigmoid
    return lambda logits: logits.softmax(dim=1)


class FastScorer(nn.Module):
    """An inference copy of a classifier for the many forwards of the faithfulness measures.

    Each batch norm that follows a convolution is folded into it (``torch.fx``; a model
    that cannot be traced keeps its batch norms) and the weights and inputs are
    channels-last: on a CPU about 1.3x each, together ~1.8x per forward (resnet18). The
    logits equal the model's up to float rounding (about 1e-6). The CAMs still come from
    the model itself: hooks and gradients need its own modules.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        net = copy.deepcopy(model).eval()
        try:
            from torch.fx.experimental.optimization import fuse

            net = fuse(net)
        except Exception as e:  # any tracing failure: keep the model unfused
            log.debug("audit: %s cannot be traced (%s); batch norms not folded", type(model), e)
        self.net = net.to(memory_format=torch.channels_last).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)


def salience_ranks(saliency: torch.Tensor) -> torch.Tensor:
    """(P,H,W) -> (P,H*W) long: each pixel's rank, 0 = most salient (ties: raster order)."""
    flat = saliency.flatten(1).float()
    order = torch.argsort(-flat, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


def baseline_images(images: torch.Tensor, kind: str = "mean", blur: float = 0.05) -> torch.Tensor:
    """What removed pixels become: ``mean`` (0 in normalised input: the dataset's mean
    intensity) or ``blur`` (a Gaussian blur of sigma ``blur`` x the shorter side)."""
    if kind == "mean":
        return torch.zeros_like(images)
    if kind != "blur":
        raise ValueError(f"baseline '{kind}': use one of {list(BASELINES)}")
    sigma = max(0.5, blur * min(images.shape[-2:]))
    radius = int(3 * sigma)
    r = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = k / k.sum()
    c = images.shape[1]
    x = F.pad(images, (radius,) * 4, mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


@dataclass
class Curves:
    """Score curves (P, steps+1) at pixel fractions ``fractions`` (steps+1,), and their AUCs (P,)."""

    fractions: torch.Tensor
    deletion: torch.Tensor
    insertion: torch.Tensor

    @property
    def deletion_auc(self) -> torch.Tensor:
        return torch.trapezoid(self.deletion, self.fractions, dim=1)

    @property
    def insertion_auc(self) -> torch.Tensor:
        return torch.trapezoid(self.insertion, self.fractions, dim=1)


def _scores(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor, score: ScoreFn, batch_size: int
) -> torch.Tensor:
    """Scores of ``targets`` (N,) for ``x`` (N,C,H,W), ``batch_size`` images per forward."""
    out = torch.empty(len(x), device=x.device)
    for start in range(0, len(x), batch_size):
        sl = slice(start, start + batch_size)
        out[sl] = score(model(x[sl]).float()).gather(1, targets[sl, None])[:, 0]
    return out


def _baseline_scores(
    model: nn.Module,
    base: torch.Tensor,
    targets: torch.Tensor,
    score: ScoreFn,
    batch_size: int,
) -> torch.Tensor:
    """Scores of the all-baseline images (P,): one forward when every image has the same
    baseline (the mean baseline: all zeros), else one per image."""
    if torch.equal(base, base[:1].expand_as(base)):
        return score(model(base[:1]).float())[0, targets]
    return _scores(model, base, targets, score, batch_size)


@torch.inference_mode()
def deletion_insertion(
    model: nn.Module,
    images: torch.Tensor,
    saliency: torch.Tensor,
    targets: torch.Tensor,
    score: ScoreFn,
    steps: int = 16,
    baseline: torch.Tensor | None = None,
    batch_size: int = 64,
    before: torch.Tensor | None = None,
) -> Curves:
    """Deletion and insertion curves of ``targets`` (P,) under ``saliency`` (P,H,W) for
    ``images`` (P,C,H,W), in chunks of ``batch_size`` perturbed images per forward.

    Step ``s`` removes (deletion) or keeps (insertion) the ``round(s / steps * H * W)``
    most salient pixels; ``baseline`` (P,C,H,W) is what removed pixels become (default 0).
    ``before``: the scores of the plain images when the caller has them already (P,).

    Only the inner steps need perturbed images: nothing removed is the plain image
    (deletion's first point, insertion's last) and everything removed is the baseline
    (deletion's last, insertion's first; one forward for all images when their baselines
    are equal). So a map costs ``2 (steps - 1)`` forwards, plus one for the plain image
    unless ``before`` is given.
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least 1")
    p, _, h, w = images.shape
    if saliency.shape != (p, h, w):
        raise ValueError(f"saliency must be (P,H,W)={(p, h, w)}, got {tuple(saliency.shape)}")
    base = torch.zeros_like(images) if baseline is None else baseline
    n = h * w
    counts = torch.round(torch.arange(steps + 1, device=images.device) / steps * n).long()
    curves = torch.empty(2, p, steps + 1, device=images.device)
    if p == 0:
        return Curves(counts.float() / n, curves[0], curves[1])
    plain = _scores(model, images, targets, score, batch_size) if before is None else before
    empty = _baseline_scores(model, base, targets, score, batch_size)
    none_, all_ = counts == 0, counts == n
    curves[0][:, none_], curves[1][:, all_] = plain[:, None].float(), plain[:, None].float()
    curves[0][:, all_], curves[1][:, none_] = empty[:, None].float(), empty[:, None].float()
    inner = (~none_ & ~all_).nonzero()[:, 0]
    m = len(inner)
    ranks = salience_ranks(saliency)
    jobs = torch.arange(2 * p * m, device=images.device)
    scores = torch.empty(len(jobs), device=images.device)
    for start in range(0, len(jobs), batch_size):
        j = jobs[start : start + batch_size]
        insertion, rest = j // (p * m), j % (p * m)
        i, s = rest // m, inner[rest % m]
        top = (ranks[i] < counts[s][:, None]).view(-1, 1, h, w)
        keep_image = top == insertion.bool().view(-1, 1, 1, 1)
        x = torch.where(keep_image, images[i], base[i])
        scores[start : start + len(j)] = score(model(x).float())[torch.arange(len(j)), targets[i]]
    curves[:, :, inner] = scores.view(2, p, m)
    return Curves(counts.float() / n, curves[0].clone(), curves[1].clone())


@dataclass
class ConfidenceChange:
    """Class scores (P,) of the images and of the images multiplied by their [0,1] maps."""

    before: torch.Tensor
    after: torch.Tensor

    @property
    def drop(self) -> torch.Tensor:
        """``max(0, before - after)``: pytorch-grad-cam's ``DropInConfidence``."""
        return (self.before - self.after).clamp_min(0)

    @property
    def average_drop(self) -> torch.Tensor:
        """Relative drop ``max(0, before - after) / before`` (Grad-CAM++'s "average drop")."""
        return self.drop / self.before.clamp_min(1e-12)

    @property
    def increase(self) -> torch.Tensor:
        """1.0 where the score rises (Grad-CAM++'s "increase in confidence"), else 0.0."""
        return (self.after > self.before).float()


@torch.inference_mode()
def confidence_change(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    score: ScoreFn,
    batch_size: int = 64,
    before: torch.Tensor | None = None,
) -> ConfidenceChange:
    """Scores of ``targets`` for ``images`` (P,C,H,W) and for ``images * maps`` ((P,H,W) in [0,1]).

    ``before``: the scores of the plain images when the caller has them already (P,).
    """
    idx = torch.arange(len(images), device=images.device)
    parts_before, parts_after = [], []
    for start in range(0, len(images), batch_size):
        sl = slice(start, start + batch_size)
        x, t, k = images[sl], maps[sl][:, None].to(images.dtype), idx[sl] - start
        if before is None:
            parts_before.append(score(model(x).float())[k, targets[sl]])
        parts_after.append(score(model(x * t).float())[k, targets[sl]])
    after = torch.cat(parts_after)
    return ConfidenceChange(torch.cat(parts_before) if before is None else before, after)
